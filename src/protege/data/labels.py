"""Checks on a label column as read from a user's file: every row has one, they are of one kind, there are two
classes at least. (Labels that silently split one class in two are worse than a refusal.)"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

from ..errors import DataError


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    try:
        x = float(str(v).strip())
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def check_labels(labels: Sequence[Any], where: str, column: str, first_row: int = 1,
                 rows: Optional[Sequence[int]] = None) -> None:
    """``labels[i]`` is row ``first_row + i`` (or ``rows[i]``) of ``where``'s column ``column``. Refuses an empty label, labels of
    mixed kinds (numbers and text; JSON booleans and numbers), and one number written two ways ("1" and "1.0"); each
    as one line naming the rows and the fix."""
    def row(i: int) -> int:
        return rows[i] if rows is not None else first_row + i

    for i, v in enumerate(labels):
        if v is None or str(v).strip() == "":
            raise DataError(f"{where}: row {row(i)} has no label in column '{column}'; fill it in or remove the row")
    kinds: dict[str, int] = {}  # kind -> the first row of that kind
    for i, v in enumerate(labels):
        kinds.setdefault(_kind(v), i)
    if len(kinds) > 1:
        shown = "; ".join(f"{kind} on row {row(i)} ({labels[i]!r})" for kind, i in kinds.items())
        raise DataError(f"{where}: column '{column}' mixes kinds of label: {shown}; write every label the same way "
                        f"(all class names, or all integers)")
    seen: dict[float, tuple[str, int]] = {}
    for i, v in enumerate(labels):
        x = _number(v)
        if x is None:
            continue
        text = str(v).strip()
        first = seen.setdefault(x, (text, i))
        if first[0] != text:
            raise DataError(f"{where}: column '{column}' writes one number two ways: {first[0]!r} on row "
                            f"{row(first[1])} and {text!r} on row {row(i)} would be two classes; write it one way")


def ordered_classes(found: Iterable[str], given: Optional[Sequence[str]], where: str, column: str) -> list[str]:
    """The class names in the order of the model's outputs: ``given`` (data.classes, e.g. a pretrained teacher's
    order), which must list every label found; by default the labels found, sorted (numbers numerically)."""
    found = set(found)
    if given is None:
        return sorted(found, key=class_order)
    require_two_classes(sorted(found, key=class_order), where, column)  # the data's own labels, not the list
    missing = sorted(found - set(given), key=class_order)
    if missing:
        raise DataError(f"{where}: {column} holds the class {missing[0]!r}, which data.classes does not list; add it to "
                        f"data.classes (in the order of the model's outputs) or remove those examples")
    return list(given)


def require_two_classes(classes: Sequence[str], where: str, column: str) -> None:
    """A training file whose label column holds a single class is a one-line DataError."""
    if len(classes) < 2:
        raise DataError(f"{where}: column '{column}' holds one class only ({classes[0] if classes else ''!r}); a "
                        f"classifier needs at least two: check data.target, or add examples of the other classes")


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "true/false"
    return "a number" if _number(v) is not None else "text"


def class_order(name: str) -> tuple:
    """The sort key of class names: numbers numerically ("2" before "10"), then names alphabetically, so that class k
    is the k-th label the way an outside teacher counts them."""
    x = _number(name)
    return (0, x, name) if x is not None else (1, 0.0, name)
