"""The search space of `protege tune` against a recipe: which fields may be tuned, the checks that make a bad space a
one-line error before anything runs, and drawing one trial's values (Optuna)."""
from __future__ import annotations

from typing import Any

from ..errors import RecipeError
from ..recipe import Recipe
from ..tune import Range, default_space
from .seeds import labels_only, with_fields

TUNABLE = ("train.", "distill.", "student.kwargs.")  # what a trial may change: how the student learns, never the data


def _value_at(data: Any, key: str) -> Any:
    """The value at a dotted path of a recipe dict; KeyError naming the first part that is not there."""
    node = data
    for part in key.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(part)
    return node


def _scalar_fields(data: Any, prefix: str = "") -> list[str]:
    """Every number field of a recipe dict (what can be tuned), as dotted paths."""
    if isinstance(data, dict):
        return [p for k, v in data.items() if k not in ("tune", "seed", "seeds") for p in _scalar_fields(v, f"{prefix}{k}.")]
    if isinstance(data, list):
        return [p for i, v in enumerate(data) for p in _scalar_fields(v, f"{prefix}{i}.")]
    return [prefix[:-1]] if isinstance(data, (int, float)) and not isinstance(data, bool) else []


def check_space(recipe: Recipe, space: dict[str, Range]) -> dict[str, Range]:
    """Refuse a field the recipe does not have, a range outside a field's allowed values, a non-integer range for an
    integer field; returns the space. Each error is one line naming ``tune.space.<field>`` and the fix."""
    import difflib

    data = recipe.model_dump(mode="json")
    for key, rng in space.items():
        where = f"tune.space.{key}"
        try:
            current = _value_at(data, key)
        except KeyError as e:
            near = difflib.get_close_matches(key, _scalar_fields(data), n=3)
            hint = f"did you mean {', '.join(near)}?" if near else "name a field as --set takes it, e.g. train.lr or distill.temperature"
            raise RecipeError(f"{where}: the recipe has no field '{key}' (no '{e.args[0]}'); {hint}") from None
        if not key.startswith(TUNABLE):
            raise RecipeError(f"{where}: '{key}' cannot be tuned: only how the student learns can (fields under "
                              f"{', '.join(TUNABLE)}); the split, the teacher and the tune itself stay fixed so no trial "
                              f"sees the test data; remove it")
        if rng.choices is None and (current is None or isinstance(current, (bool, str, list, dict))):
            raise RecipeError(f"{where}: '{key}' is {'empty' if current is None else 'not a number'} in the recipe; a "
                              f"low/high range needs a number field (give it a value in the recipe), or use choices: [...]")
        values = rng.choices if rng.choices is not None else [rng.low, rng.high]
        if rng.choices is None and isinstance(current, int):
            if not all(float(v).is_integer() for v in (rng.low, rng.high, rng.step or 1)):
                raise RecipeError(f"{where}: '{key}' is an integer field; give integer low, high and step (got {rng.low:g}, "
                                  f"{rng.high:g}{f', step {rng.step:g}' if rng.step else ''})")
            values = [int(rng.low), int(rng.high)]
        for v in values:
            try:
                with_fields(recipe, {key: v}, where)
            except RecipeError as e:
                why = str(e).split(": ", 1)[-1]
                raise RecipeError(f"{where}: {v!r} is outside the field's allowed values ({why}); narrow the range") from None
    return space


def sample(trial, recipe: Recipe, space: dict[str, Range]) -> dict[str, Any]:
    """One trial's values, drawn by Optuna from ``space`` (integer fields as integers)."""
    data = recipe.model_dump(mode="json")
    out = {}
    for key, rng in space.items():
        if rng.choices is not None:
            out[key] = trial.suggest_categorical(key, rng.choices)
            continue
        current = _value_at(data, key)
        if isinstance(current, int) and not isinstance(current, bool):
            out[key] = trial.suggest_int(key, int(rng.low), int(rng.high), log=rng.log, step=int(rng.step or 1))
        else:
            out[key] = trial.suggest_float(key, rng.low, rng.high, log=rng.log, step=rng.step)
    return out


def search_spaces(recipe: Recipe, baseline: bool) -> dict[str, dict[str, Range]]:
    """The search space of each study: the recipe's (or its method's default) for the distilled student, and for the
    labels-only student the same without the distillation fields."""
    data = recipe.model_dump(mode="json")
    given = recipe.tune.space
    spaces = {"distilled": check_space(recipe, given if given is not None else default_space(data, baseline=False))}
    if baseline:
        base = labels_only(recipe)
        own = {k: v for k, v in (given or default_space(data, baseline=True)).items() if not k.startswith("distill.")}
        spaces["baseline"] = check_space(base, own)
    return spaces


def at_edge(recipe: Recipe, space: dict[str, Range], params: dict[str, Any], margin: float = 0.05) -> dict[str, dict]:
    """The best trial's values that lie within ``margin`` of a range's end (a share of its width, on the log scale for
    a log range): the best value may lie beyond the range. Each entry says which end, and whether the field allows
    values past it (``widen``: false where the end is the field's own limit, such as alpha's 0)."""
    import math

    found = {}
    for key, v in params.items():
        rng = space.get(key)
        if rng is None or rng.choices is not None:
            continue
        whole = isinstance(v, int) and not isinstance(v, bool)
        high = rng.high if rng.step is None else rng.low + math.floor((rng.high - rng.low) / rng.step + 1e-9) * rng.step
        f = math.log if rng.log else float  # (a grid's top is its last point: Optuna never draws above it)
        width = f(high) - f(rng.low)
        for end, bound, sign in (("low", rng.low, -1), ("high", high, 1)):
            if abs(f(v) - f(bound)) > margin * width:
                continue
            if whole:  # just past the end: is the field allowed to go there?
                beyond: float = int(round(bound)) + sign
            elif rng.log:
                beyond = bound * (1 + 1e-6) ** sign
            else:
                beyond = bound + sign * max(1e-6 * (high - rng.low), 1e-12)
            try:
                with_fields(recipe, {key: beyond})
                widen = True
            except RecipeError:
                widen = False
            found[key] = {"end": end, "value": v, "range": [rng.low, rng.high], "widen": widen}
    return found


def edge_advice(kind: str, edges: dict[str, dict]) -> list[str]:
    """One line per value at an edge: which, and what to do about it."""
    lines = []
    for key, e in edges.items():
        lo, hi = e["range"]
        what = f"tune {kind}: the best trial's {key} ({e['value']:.4g}) lies at the {e['end']} end of its range [{lo:g}, {hi:g}]"
        lines.append(f"{what}; the best value may lie beyond it: widen tune.space.{key} and run again with more trials"
                     if e["widen"] else f"{what}, which is the field's own limit")
    return lines
