"""The Python API the CLI calls (protege.api): inspect's --input-shape."""
from __future__ import annotations

from .helpers import assert_clean_error, run_cli


def test_input_shape_with_a_letter_is_refused(capsys):
    code, err = run_cli(["inspect", "mlp", "--input-shape", "1,x,28"], capsys)
    assert_clean_error(code, err, "--input-shape '1,x,28'", "positive integers")
