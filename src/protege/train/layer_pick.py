"""What initialising a student from its teacher's layers shares between model families: which teacher layers
each student layer takes (select or average), and the report of what was copied."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ModelError


@dataclass
class InitReport:
    method: str
    layers_copied: int  # student Linear/Conv2d layers written (with their BatchNorms)
    mapping: list[tuple[str, str]] = field(default_factory=list)  # student layer -> teacher layer(s), "a+b" = averaged


def fail(msg: str) -> ModelError:
    return ModelError(f"init_from_teacher: {msg}")


def pick_layers(n_s: int, n_t: int, method: str, every: int | None, where: str, unit: str) -> list[list[int]]:
    """Teacher layer indices for each of the ``n_s`` student layers of a stage. Student layer i starts at
    i * every, or at floor(i * n_t / n_s) (= i * k for k = n_t // n_s when it divides: first kept, spread
    evenly); select takes that layer, average that layer up to the next start (k layers)."""
    if n_s > n_t:
        raise fail(f"student {where} has {n_s} {unit} but the teacher only {n_t}; "
                    f"a student can only be shallower than or as deep as its teacher")
    if every is not None and (n_s - 1) * every >= n_t:
        raise fail(f"every={every} needs {(n_s - 1) * every + 1} {unit} in teacher {where} but it has {n_t}; "
                    f"lower every or leave it unset")
    starts = [i * every if every else i * n_t // max(n_s, 1) for i in range(n_s + 1)]
    return [list(range(a, a + 1 if method == "select" else min(b, n_t))) for a, b in zip(starts, starts[1:])]
