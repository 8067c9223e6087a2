"""Files that describe themselves: what a served ONNX file's inputs and outputs mean, in its metadata_props.

Keys (values are JSON): protege.version, protege.task, protege.classes, protege.input (name, shape, dtype and the
preprocessing that turns raw data into it), protege.output, and for int8 files protege.int8 (the scheme, whether it
is portable). ONNX Runtime shows them as ``session.get_modelmeta().custom_metadata_map``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from ..errors import StorageError
from ..files import write_error, write_fix
from ..version import __version__

PREFIX = "protege."


def describe(data, task: str) -> dict[str, Any]:
    """What a deployed file's input and output mean, from the data it was trained on (a DataSplits)."""

    dtype = "int64" if data.is_text else "float32"
    card: dict[str, Any] = {
        "version": __version__, "task": task,
        "input": {"name": "input", "shape": ["batch", *data.input_shape], "dtype": dtype, "preprocessing": data.preprocessing},
    }
    if data.is_lm:
        card["output"] = {"name": "logits", "shape": ["batch", data.input_shape[0], data.num_classes],
                          "meaning": "next-token logits over the tokenizer's vocabulary at each position"}
    else:
        card["classes"] = list(data.class_names)
        card["output"] = {"name": "logits", "shape": ["batch", data.num_classes],
                          "meaning": "class logits in the order of protege.classes (softmax for probabilities)"}
    return card


def stamp(path: str | Path, card: dict[str, Any], int8: Optional[dict] = None) -> None:
    """Write ``card`` (and the int8 scheme) into the ONNX file's metadata, replacing earlier protege keys; atomic."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path))
    keep = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    entries = dict(card, **({"int8": int8} if int8 else {}))
    for key, value in keep + [(PREFIX + k, json.dumps(v)) for k, v in entries.items()]:
        model.metadata_props.add(key=key, value=value)
    tmp = path.with_suffix(".meta.tmp")
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    except OSError as e:

        raise StorageError(f"cannot write {path} ({write_error(e)}); {write_fix(e, path)}, then run the command again") from None
    finally:
        tmp.unlink(missing_ok=True)


def read(path: str | Path) -> dict[str, Any]:
    """The protege keys of an ONNX file's metadata, decoded (key without the prefix -> value)."""
    import onnx

    props = onnx.load(str(path), load_external_data=False).metadata_props
    out: dict[str, Any] = {}
    for p in props:
        if p.key.startswith(PREFIX):
            try:
                out[p.key[len(PREFIX):]] = json.loads(p.value)
            except ValueError:  # written by something else: keep the text
                out[p.key[len(PREFIX):]] = p.value
    return out
