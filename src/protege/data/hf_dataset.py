"""A Hugging Face `datasets` folder (written by save_to_disk) or Parquet files as a data source: an image column or
numeric columns as the inputs, a label column (a ClassLabel keeps its names), and the dataset's own splits (train,
validation, test) where it has them."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from ..errors import DataError
from ..logs import quiet
from .arrays import require_finite
from .images import decode_images
from .labels import check_labels, ordered_classes, require_two_classes

SPLITS = {"train": ("train",), "val": ("validation", "valid", "val"), "test": ("test",)}


@quiet(stderr=True)  # datasets' progress bars ("Generating train split") while it converts Parquet to Arrow
def open_dataset(path: str) -> dict[str, Any]:
    """role (train, val, test; or "all" for a dataset without splits) -> a `datasets.Dataset`."""
    import datasets  # an optional dependency (pip install 'protege[datasets]'): only hf_dataset runs need it

    p = Path(path)
    if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
        try:
            d = datasets.load_from_disk(str(p))
        except Exception as e:  # datasets raises its own error types for a damaged folder
            raise DataError(f"{p} is not a readable datasets folder ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                            f"write it again with Dataset.save_to_disk") from None
        if isinstance(d, datasets.Dataset):
            return {"all": d}
        found = {role: d[name] for role, names in SPLITS.items() for name in names if name in d}
        if "train" not in found:
            raise DataError(f"{p} has the splits {', '.join(d)} but no train split; name the training split 'train'")
        return found
    files = [p] if p.is_file() and p.suffix == ".parquet" else sorted(p.glob("**/*.parquet")) if p.is_dir() else []
    if not files:
        raise DataError(f"'{p}' is neither a datasets folder (save_to_disk: dataset_dict.json or state.json) nor Parquet "
                        f"files; set data.path to one")
    groups: dict[str, list[str]] = {}
    for f in files:  # the Hub's layouts: train-00000-of-00002.parquet, or <config>/train/0000.parquet
        role = next((r for r, names in SPLITS.items() if f.name.split("-")[0].split(".")[0] in names or f.parent.name in names),
                    "all")
        groups.setdefault(role, []).append(str(f))
    if "all" in groups and len(groups) > 1:
        groups = {"all": [str(f) for f in files]}
    if "all" not in groups and "train" not in groups:
        raise DataError(f"{p} has Parquet files of the splits {', '.join(groups)} but none of a train split; add the "
                        f"training files (train-*.parquet)")
    try:
        return {role: datasets.Dataset.from_parquet(groups[role]) for role in ("all", "train", "val", "test") if role in groups}
    except Exception as e:  # pyarrow raises its own types for a damaged file
        raise DataError(f"{p}: Parquet files that cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        f"write them again") from None


def _labels(parts: dict[str, Any], target: str, where: str, given: Optional[list[str]]) -> tuple[dict[str, np.ndarray], list[str]]:
    for role, ds in parts.items():
        if target not in ds.column_names:
            raise DataError(f"{where} ({role}) has no label column '{target}' (data.target); its columns: "
                            f"{', '.join(ds.column_names)}")
    first = next(iter(parts.values()))
    names = getattr(first.features[target], "names", None)
    if names is not None and given is not None and list(given) != list(names):
        raise DataError(f"{where}: the label column '{target}' is a ClassLabel, whose names fix the class order "
                        f"({', '.join(map(str, names[:6]))}{', ...' if len(names) > 6 else ''}); remove data.classes")
    if names is not None:  # a ClassLabel: integers with names; -1 means "no label"
        out = {role: np.asarray(ds[target], dtype=np.int64) for role, ds in parts.items()}
        for role, y in out.items():
            bad = np.flatnonzero((y < 0) | (y >= len(names)))
            if len(bad):
                raise DataError(f"{where} ({role}): {len(bad)} rows have no label ({int(y[bad[0]])} on row {int(bad[0])}; "
                                f"a ClassLabel of {len(names)} classes); label them, or leave that split out of the folder")
        return out, list(names)
    raw = {role: list(ds[target]) for role, ds in parts.items()}
    for role, values in raw.items():
        check_labels(values, f"{where} ({role})", target, first_row=0)
    classes = ordered_classes((str(v) for v in raw.get("train", raw.get("all"))), given, where, f"column '{target}'")
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for role, values in raw.items():
        unknown = next((v for v in values if str(v) not in index), None)
        if unknown is not None:
            raise DataError(f"{where} ({role}): label {unknown!r} does not occur in the training split; fix the label or "
                            f"add training examples of it")
        out[role] = np.array([index[str(v)] for v in values], dtype=np.int64)
    return out, classes


def _image(value: Any) -> Image.Image:
    """A cell of an image column as a PIL image: decoded already, or {bytes, path} (an Image(decode=False) column)."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and value.get("bytes"):
        return Image.open(io.BytesIO(value["bytes"]))
    if isinstance(value, dict) and value.get("path"):
        return Image.open(value["path"])
    raise ValueError(f"the cell holds {type(value).__name__}, not an image")


def _image_column(ds: Any, wanted: Optional[str], where: str) -> Optional[str]:
    import datasets  # optional dependency, as above

    if wanted is not None:
        if wanted not in ds.column_names:
            raise DataError(f"{where} has no column '{wanted}' (data.image); its columns: {', '.join(ds.column_names)}")
        return wanted
    images = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
    return images[0] if len(images) == 1 else None


def read_hf_dataset(path: str, target: str, columns: Optional[list[str]], image: Optional[str], channels: Optional[int],
                    size: Optional[list[int]], skip_bad: bool, text: str = "text",
                    classes: Optional[list[str]] = None) -> tuple[dict[str, tuple[Any, np.ndarray]], list[str], str]:
    """role -> (inputs, class indices), the class names, and what the inputs are: "columns" (float32 (N, features)
    from ``columns``), "images" (uint8 (N, C, H, W) from the image column) or "text" (a list of strings from the
    column ``text``, when there is no image column)."""
    parts = open_dataset(path)
    first = next(iter(parts.values()))
    labels, classes = _labels(parts, target, path, classes)
    require_two_classes(classes, path, target)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if columns:
        missing = [c for c in columns if c not in first.column_names]
        if missing:
            raise DataError(f"{path} has no column '{missing[0]}' (data.columns); its columns: {', '.join(first.column_names)}")
        for role, ds in parts.items():
            try:
                x = np.concatenate([np.asarray(ds[c], dtype=np.float32).reshape(len(ds), -1) for c in columns], axis=1)
            except (ValueError, TypeError) as e:
                raise DataError(f"{path} ({role}): data.columns must hold numbers or equal-length lists of numbers "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:100]})") from None
            require_finite(x, Path(f"{path} ({role})"))
            out[role] = (x, labels[role])
        return out, classes, "columns"
    col = _image_column(first, image, path)
    if col is None and text in first.column_names and image is None:
        return {role: (list(ds[text]), labels[role]) for role, ds in parts.items()}, classes, "text"
    if col is None:
        raise DataError(f"{path}: say which columns are the inputs: data.image (an image column), data.columns (numeric "
                        f"columns) or data.text (a text column); its columns: {', '.join(f'{c} ({type(f).__name__})' for c, f in first.features.items())}")
    shape = None
    for role, ds in parts.items():  # train first: its channel count holds for the other splits
        items = [(f"{path} ({role}) row {i}", lambda ds=ds, i=i: _image(ds[i][col])) for i in range(len(ds))]
        x, kept, _ = decode_images(items, channels, size, skip_bad)
        if shape is not None and x.shape[1:] != shape:
            raise DataError(f"{path}: the {role} images are {list(x.shape[1:])} (channels, height, width) but the training "
                            f"images {list(shape)}; set data.image_size (and data.channels) to make them one size")
        shape, channels = x.shape[1:], x.shape[1]
        out[role] = (x, labels[role][kept])
    return out, classes, "images"
