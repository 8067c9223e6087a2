"""Reliability verdicts of protege.evaluate.profile on a quiet and a busy machine (this suite's QUIET and BUSY
load verdicts differ from test_profile.py's, so these two tests keep their own file)."""
from __future__ import annotations

import pytest

from protege.evaluate.profile import Measurement, load_verdict


QUIET = {"other_share": 0.01, "resolution": 0.001, "loadavg_1min": 0.3, "cpus": 2, "busy": False, "reason": None}
BUSY = load_verdict(0.43, 0.001, 2.5, 2)


def test_a_tight_figure_is_reliable_and_a_wide_one_is_not():
    tight, wide = [[1.0, 1.01, 0.99]] * 3, [[1.0, 3.0, 0.3], [0.5, 2.0, 1.0]]
    m = Measurement({"tight": tight, "wide": wide}, dict(QUIET))
    assert m.stats("tight")["reliable"] and m.stats("tight")["reasons"] == []
    bad = m.stats("wide")
    assert not bad["reliable"] and bad["reasons"] == [f"spread {bad['spread']:.0%} of the median"]
    assert m.ratio("tight", "tight")[1] is True
    assert m.ratio("wide", "tight")[1] is False and m.ratio("tight", "wide")[1] is False  # either figure spoils a ratio


def test_a_busy_machine_makes_every_figure_unreliable():
    m = Measurement({"a": [[1.0, 1.0]] * 3, "b": [[2.0, 2.0]] * 3}, BUSY)
    for name in ("a", "b"):
        assert m.stats(name)["reasons"] == ["machine busy: other processes used 43% of the CPU while measuring"]
    assert m.ratio("b", "a") == (pytest.approx(2.0), False)
