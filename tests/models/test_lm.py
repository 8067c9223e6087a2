"""Causal LMs (protege.models.lm): converting GGUF files."""
import pytest

from protege.errors import ModelError


def test_convert_gguf_refuses_other_files(tmp_path):
    from protege.models.lm import convert_gguf

    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelError, match="not a .gguf file"):
        convert_gguf(f, tmp_path / "out")
