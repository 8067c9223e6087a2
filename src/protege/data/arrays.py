"""NumPy arrays as a data source: inputs of any shape and their labels, from .npy files (memory-mapped, so only the
examples used are read) or one .npz file (arrays `x` and `y`)."""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import DataError
from .labels import check_labels, ordered_classes, require_two_classes


def read_arrays(path: str, labels: Optional[str], classes: Optional[list[str]] = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(inputs, class index per example, class names) from ``path`` (.npy inputs with ``labels`` a .npy of labels, or
    a .npz holding `x` and `y`). Classes: the sorted distinct labels (numbers numerically)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"arrays file '{p}' not found; set data.path to a .npy file of inputs (with data.labels) or a .npz "
                        f"file holding x and y")
    if p.suffix == ".npz":
        if labels:
            raise DataError(f"data.labels is for a .npy file of inputs; '{p}' is a .npz, whose array y holds the labels: "
                            f"remove data.labels")
        with _open(np.load, p) as z:
            missing = [k for k in ("x", "y") if k not in z.files]
            if missing:
                raise DataError(f"{p} has no array {' or '.join(missing)}; its arrays: {', '.join(z.files) or 'none'}; save "
                                f"it with np.savez(path, x=inputs, y=labels)")
            x, y = (_pickled(lambda k=k: z[k], p) for k in ("x", "y"))
    elif p.suffix == ".npy":
        if not labels:
            raise DataError(f"data.path '{p}' holds the inputs only; set data.labels to a .npy file of one label per example")
        x = _open(np.load, p, mmap_mode="r")
        y = _open(np.load, Path(labels))
    else:
        raise DataError(f"arrays file '{p}' has suffix '{p.suffix}'; use .npy (inputs, with data.labels) or .npz (x and y)")
    return _checked(x, y, p, classes)


def _open(load, path: Path, **kw):
    if not path.is_file():
        raise DataError(f"labels file '{path}' not found; set data.labels to a .npy file of one label per example")
    try:
        return _pickled(lambda: load(path, allow_pickle=False, **kw), path)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:  # truncated, damaged or not NumPy at all
        raise DataError(f"{path} is not a readable NumPy file ({type(e).__name__}); save it again with np.save / np.savez") from None


def _pickled(read, path: Path):
    """``read()``, with NumPy's refusal of an object array (it would need unpickling) as a one-line DataError."""
    try:
        return read()
    except ValueError as e:
        if "allow_pickle" not in str(e):
            raise
        raise DataError(f"{path} holds Python objects, which protege does not unpickle; save numbers or strings "
                        f"(np.save / np.savez with a numeric or str dtype)") from None


def _checked(x: np.ndarray, y: np.ndarray, p: Path, given: Optional[list[str]]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if x.ndim < 2:
        raise DataError(f"{p}: inputs of shape {list(x.shape)}; the first axis counts examples and each example needs at "
                        f"least one value (shape [N, features] or [N, C, H, W])")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise DataError(f"{p}: inputs of dtype {x.dtype}; save numbers (float or integer)")
    if np.issubdtype(x.dtype, np.floating):
        require_finite(x, p)
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{p}: {len(x)} inputs but labels of shape {list(y.shape)}; give one label per example (shape [{len(x)}])")
    if np.issubdtype(y.dtype, np.floating) and not np.isfinite(y).all():
        bad = int(np.flatnonzero(~np.isfinite(y))[0])
        raise DataError(f"{p}: label {bad} is {y[bad]}; every label must be a class (a number or a name)")
    raw = y.tolist()
    check_labels(raw, str(p), "labels", first_row=0)
    classes = ordered_classes((str(v) for v in raw), given, str(p), "the labels")
    require_two_classes(classes, str(p), "labels")
    index = {c: i for i, c in enumerate(classes)}
    return x, np.array([index[str(v)] for v in raw], dtype=np.int64), classes


def require_finite(x: np.ndarray, p: Path, chunk: int = 4096) -> None:
    """Every input value finite (read in chunks: a memory-mapped file is not copied whole); else one line naming the
    example and the position of the first NaN or inf."""
    for start in range(0, len(x), chunk):
        bad = ~np.isfinite(np.asarray(x[start:start + chunk]))
        if bad.any():
            where = np.argwhere(bad)[0]
            raise DataError(f"{p}: example {start + int(where[0])} holds {x[start + int(where[0])][tuple(where[1:])]} at "
                            f"position {[int(i) for i in where[1:]]}; inputs must be finite numbers (a missing value is "
                            f"NaN): fix or drop that example")


def scale(x_train: np.ndarray, how: str, chunk: int = 4096) -> tuple[float, float, list[str]]:
    """(shift, divisor, the steps in words) so that (x - shift) / divisor is the scaling ``how``, over all training
    values at once (as for images: one mean and std, not one per pixel). Computed chunk by chunk in float64, so no
    float64 copy of the whole set is made."""
    if how == "none":
        return 0.0, 1.0, ["as they are"]
    def chunks():
        for i in range(0, len(x_train), chunk):
            yield np.asarray(x_train[i:i + chunk], dtype=np.float64)

    if how == "minmax":
        lo, hi = min(float(c.min()) for c in chunks()), max(float(c.max()) for c in chunks())
        return lo, (hi - lo) or 1.0, [f"(x - {lo:g}) / {(hi - lo) or 1.0:g}  (min and max of the training values)"]
    n = sum(c.size for c in chunks())
    mean = sum(float(c.sum()) for c in chunks()) / n
    std = (sum(float(((c - mean) ** 2).sum()) for c in chunks()) / n) ** 0.5
    return mean, std or 1.0, [f"(x - {mean:.6g}) / {std or 1.0:.6g}  (mean and std of all training values)"]
