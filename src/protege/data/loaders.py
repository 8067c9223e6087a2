"""Readers for the data sources a recipe names, each returning seeded train/val/test splits."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from ..errors import DataError
from .arrays import read_arrays, scale
from .base import DataSplits, Split
from .config import DataConfig
from .hf_dataset import read_hf_dataset
from .images import read_images
from .labels import require_two_classes
from .lm import load_lm_corpus
from .tabular import read_csv_table
from .stream import DEFAULT_WORKERS, Rows, affine, as_tensor
from .text import cached_tokenize, label_ids, tokenize_cached, tokenizer_digest

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


def _split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> tuple:
    """Stratified seeded split; returns (x_keep, x_held, y_keep, y_held)."""
    classes, counts = np.unique(y, return_counts=True)
    if counts.min() < 2:
        raise DataError(f"class {classes[counts.argmin()]!r} has a single example, too few to split; "
                        f"remove it or merge it into another class")
    if round(fraction * len(y)) < len(classes) or round((1 - fraction) * len(y)) < len(classes):
        raise DataError(f"a split of fraction {fraction} of {len(y)} examples cannot hold all {len(classes)} classes; "
                        f"raise data.val_fraction / data.test_fraction or add data")
    return train_test_split(x, y, test_size=fraction, random_state=seed, stratify=y)


def _limit(x: np.ndarray, y: np.ndarray, limit: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if limit is None or limit >= len(y):
        return x, y
    keep = np.random.default_rng(seed).permutation(len(y))[:limit]
    return x[keep], y[keep]


def _splits(x_train, y_train, x_val, y_val, x_test, y_test, **kw) -> DataSplits:
    def t(x, y):
        return Split(torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64))

    return DataSplits(train=t(x_train, y_train), val=t(x_val, y_val), test=t(x_test, y_test), **kw)


def load_digits_data(cfg: DataConfig, seed: int) -> DataSplits:
    """scikit-learn's 1,797 8x8 digits as (1, 8, 8) images in [0, 1], standardised."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8)
    x = (x - 0.3) / 0.4
    x_rest, x_test, y_rest, y_test = _split(x, d.target, cfg.test_fraction, seed)
    x_train, x_val, y_train, y_val = _split(x_rest, y_rest, cfg.val_fraction, seed)
    x_train, y_train = _limit(x_train, y_train, cfg.limit, seed)
    return _splits(x_train, y_train, x_val, y_val, x_test, y_test, num_classes=10, input_shape=(1, 8, 8),
                   class_names=[str(i) for i in range(10)], is_image=True, description="sklearn digits 8x8",
                   preprocessing={"raw": "8x8 grayscale, values 0..16 (scikit-learn digits)", "layout": "N, 1, 8, 8",
                                  "steps": ["x / 16", "(x - 0.3) / 0.4"]})


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(cfg: DataConfig, seed: int) -> DataSplits:
    """Fashion-MNIST (Xiao et al. 2017): 60k train (val carved out, seeded) + the official 10k test."""
    folder = Path(cfg.path) if cfg.path else FASHION_DIR
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"Fashion-MNIST file {folder / missing[0]} not found; install it with "
                        f"`sudo apt-get install dataset-fashion-mnist` or set data.path to the folder holding the idx.gz files")
    try:
        xs, ys, xt, yt = (_read_idx(folder / n) for n in names)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"Fashion-MNIST files in {folder} are unreadable ({e}); reinstall dataset-fashion-mnist") from None

    def norm(a: np.ndarray) -> np.ndarray:
        return ((a.astype(np.float32) / 255.0 - FASHION_MEAN) / FASHION_STD)[:, None]

    x_train, x_val, y_train, y_val = _split(norm(xs), ys.astype(np.int64), cfg.val_fraction, seed)
    x_train, y_train = _limit(x_train, y_train, cfg.limit, seed)
    return _splits(x_train, y_train, x_val, y_val, norm(xt), yt.astype(np.int64), num_classes=10,
                   input_shape=(1, 28, 28), class_names=FASHION_CLASSES, is_image=True, description="Fashion-MNIST 28x28",
                   preprocessing={"raw": "28x28 grayscale, values 0..255", "layout": "N, 1, 28, 28",
                                  "steps": ["x / 255", f"(x - {FASHION_MEAN}) / {FASHION_STD}"]})


def load_csv(cfg: DataConfig, seed: int) -> DataSplits:
    """A CSV table; scaling and one-hot encoding are fitted on the training split only."""
    if not cfg.path:
        raise DataError("data.source is 'csv' but data.path is empty; set data.path to the .csv file")
    if not cfg.target:
        raise DataError("data.source is 'csv' but data.target is empty; set data.target to the label column")
    table = read_csv_table(Path(cfg.path), cfg.target, cfg.encoding)
    require_two_classes(table.classes, cfg.path, cfg.target)
    if cfg.columns is not None or cfg.drop:
        table = table.select(cfg.columns, cfg.drop)
    idx = np.arange(len(table.labels))
    rest, test = _split(idx, table.labels, cfg.test_fraction, seed)[:2]
    train, val = _split(rest, table.labels[rest], cfg.val_fraction, seed)[:2]
    train = _limit(train, train, cfg.limit, seed)[0]
    enc = table.fit_encoder(train, cfg.numeric, cfg.categorical, cfg.scaling, cfg.missing)
    shape = _row_shape(cfg, enc)
    y = table.labels
    x = {name: enc(rows).reshape(len(rows), *shape) for name, rows in (("train", train), ("val", val), ("test", test))}
    n_num = len(enc.describe["numeric"])
    parts = [f"{n_num} numeric columns {SCALED[cfg.scaling]}"] + \
        ([f"{len(table.columns) - n_num} categorical one-hot"] if len(table.columns) > n_num else []) + \
        ([f"dropped {', '.join(cfg.drop)}"] if cfg.drop else []) + ([f"rows as {list(shape)}"] if cfg.shape else [])
    return _splits(x["train"], y[train], x["val"], y[val], x["test"], y[test], num_classes=len(table.classes),
                   input_shape=shape, class_names=table.classes, is_image=len(shape) == 3,
                   description=f"CSV {cfg.path} ({'; '.join(parts)})",
                   preprocessing={**enc.describe, **({"layout": f"N, {', '.join(map(str, shape))}"} if cfg.shape else {})})


SCALED = {"standardize": "standardised", "minmax": "scaled to [0, 1]", "none": "unscaled"}


def _row_shape(cfg: DataConfig, enc) -> tuple[int, ...]:
    """(features,), or data.shape when it holds exactly that many values."""
    if cfg.shape is None:
        return (enc.width,)
    if int(np.prod(cfg.shape)) != enc.width:
        raise DataError(f"{cfg.path}: data.shape {cfg.shape} holds {int(np.prod(cfg.shape))} values but each row has "
                        f"{enc.width} features after encoding; choose the pixel columns with data.columns / data.drop, or "
                        f"fix data.shape")
    return tuple(cfg.shape)


def load_arrays(cfg: DataConfig, seed: int) -> DataSplits:
    """NumPy inputs and labels; split like a table, scaled over all training values (data.scaling), reshaped
    (data.shape). Only the examples used are read from a .npy file (memory-mapped)."""
    if not cfg.path:
        raise DataError("data.source is 'arrays' but data.path is empty; set data.path to a .npy (with data.labels) or .npz file")
    x, y, classes = read_arrays(cfg.path, cfg.labels, cfg.classes)
    return _array_splits(cfg, seed, {"all": (x, y)}, classes, f"arrays {cfg.path}", f"{x.dtype} arrays")


def load_images(cfg: DataConfig, seed: int) -> DataSplits:
    """Image files (class folders or a manifest) decoded with Pillow to one channel count and size, as x / 255, then
    scaled over all training values (data.scaling)."""
    if not cfg.path:
        raise DataError("data.source is 'images' but data.path is empty; set data.path to a folder with one subfolder "
                        "per class, or a .csv / .jsonl manifest (path, label)")
    x, y, classes, skipped, digest = read_images(cfg.path, cfg.channels, cfg.image_size, cfg.skip_bad_files, cfg.encoding,
                                                     cfg.classes)
    skip = f", {len(skipped)} unreadable files skipped" if skipped else ""
    return _array_splits(cfg, seed, {"all": (x, y)}, classes, f"images {cfg.path}{skip}", "uint8 images (0..255)", divide=255.0,
                         extra={"skipped_files": len(skipped)} if cfg.skip_bad_files else {}, digest=digest)


def load_hf_dataset(cfg: DataConfig, seed: int) -> DataSplits:
    """A Hugging Face datasets folder or Parquet files: an image column (as the images source), numeric columns (as
    the arrays source) or a text column (as the text source); the dataset's test and validation splits are used where
    it has them."""
    if not cfg.path:
        raise DataError("data.source is 'hf_dataset' but data.path is empty; set data.path to a save_to_disk folder or "
                        "Parquet files")
    parts, classes, kind = read_hf_dataset(cfg.path, cfg.target or "label", cfg.columns, cfg.image, cfg.channels,
                                           cfg.image_size, cfg.skip_bad_files, cfg.text, cfg.classes)
    what = f"Hugging Face dataset {cfg.path} ({', '.join(parts)})"
    if kind == "text":
        if not cfg.tokenizer:
            raise DataError(f"{cfg.path}: its inputs are the text column '{cfg.text}': set data.tokenizer to a Hugging Face "
                            f"folder with the tokenizer")
        h = hashlib.sha256(json.dumps([cfg.text, tokenizer_digest(cfg.tokenizer), cfg.max_length, cfg.too_long]).encode())
        for role, (texts, y) in parts.items():
            h.update(json.dumps([role, texts, y.tolist()]).encode())
        read = lambda: [(f"{cfg.path} ({role})", texts, [classes[i] for i in y]) for role, (texts, y) in parts.items()]  # noqa: E731
        tokens, info = tokenize_cached(h.hexdigest()[:20], read, cfg.tokenizer, cfg.max_length, cfg.too_long)
        ids = {role: (t[0], parts[role][1]) for role, t in zip(parts, tokens)}
        return _text_splits(cfg, seed, ids, classes, info, what)
    return _array_splits(cfg, seed, parts, classes, what, "uint8 images (0..255)" if kind == "images" else "float32 columns",
                         divide=255.0 if kind == "images" else 1.0)


def _given(parts: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """All examples of ``parts`` (role -> (inputs, class indices)) in one array, and the indices of each role."""
    if len(parts) == 1:
        (x, y), = parts.values()
        return x, y, {"all": np.arange(len(y))}
    ends = np.cumsum([len(p[1]) for p in parts.values()])
    given = {role: np.arange(end - len(p[1]), end) for (role, p), end in zip(parts.items(), ends)}
    return np.concatenate([p[0] for p in parts.values()]), np.concatenate([p[1] for p in parts.values()]), given


def _text_splits(cfg: DataConfig, seed: int, parts: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str],
                 info: dict, what: str) -> DataSplits:
    """Token ids (role -> (ids, class indices)) padded on the right to one length and split (see _roles)."""
    width = max(ids.shape[1] for ids, _ in parts.values())
    pad = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=info["pad_id"])  # noqa: E731
    x, y, given = _given({role: (pad(ids), labels) for role, (ids, labels) in parts.items()})
    train, val, test = _roles(cfg, seed, y, given)

    def t(rows):
        return Split(torch.as_tensor(x[rows].astype(np.int64)), torch.as_tensor(y[rows], dtype=torch.int64), info["pad_id"])

    return DataSplits(train=t(train), val=t(val), test=t(test), num_classes=len(classes), input_shape=(width,),
                      class_names=classes, description=f"{what} ({width} tokens)", vocab_size=info["vocab_size"],
                      pad_id=info["pad_id"],
                      preprocessing={"tokenizer": cfg.tokenizer, "text_column": cfg.text, "length": width, "pad_id": info["pad_id"],
                                     "too_long": cfg.too_long, "dtype": "int64 token ids, padded on the right to length"})


def _roles(cfg: DataConfig, seed: int, y: np.ndarray, given: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of train, validation and test: the ``given`` ones (indices of a dataset's own splits), the others split
    off the training examples (stratified, seeded)."""
    pool = given.get("train", given.get("all"))
    if "test" in given:
        rest, test = pool, given["test"]
    else:
        rest, test = _split(pool, y[pool], cfg.test_fraction, seed)[:2]
    if "val" in given:
        train, val = rest, given["val"]
    else:
        train, val = _split(rest, y[rest], cfg.val_fraction, seed)[:2]
    return _limit(train, train, cfg.limit, seed)[0], val, test


def _array_splits(cfg: DataConfig, seed: int, parts: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str],
                  what: str, raw: str, divide: float = 1.0, extra: Optional[dict] = None,
                  digest: Optional[str] = None) -> DataSplits:
    """Splits of in-memory (or memory-mapped) examples: ``parts`` maps a role (train, val, test; "all" when the data
    has no splits of its own) to (inputs, class indices). x / ``divide`` is scaled over all training values
    (data.scaling) and each example reshaped (data.shape). Streamed (data.stream), the splits read their rows from
    ``x`` on demand (``digest``: a hash of x's bytes, if known); else they are float32 tensors in memory."""
    x, y, given = _given(parts)
    train, val, test = _roles(cfg, seed, y, given)
    shape = tuple(cfg.shape) if cfg.shape else tuple(x.shape[1:])
    if int(np.prod(shape)) != int(np.prod(x.shape[1:])):
        raise DataError(f"{cfg.path}: data.shape {list(shape)} holds {int(np.prod(shape))} values but each example has "
                        f"{int(np.prod(x.shape[1:]))} (shape {list(x.shape[1:])}); fix data.shape")
    shift, divisor, steps = scale(Rows(x, train, x.shape[1:], divide), cfg.scaling)
    streamed = _streamed(cfg, x)
    workers = (DEFAULT_WORKERS if cfg.workers is None else cfg.workers) if streamed else 0
    rows = {"train": train, "val": val, "test": test}
    if streamed:
        split = {k: Split(Rows(x, r, shape, divide, shift, divisor, digest, workers if k == "train" else 0),
                          torch.as_tensor(y[r], dtype=torch.int64)) for k, r in rows.items()}
    else:
        split = {k: Split(as_tensor(affine(x[r], divide, shift, divisor, shape)),
                          torch.as_tensor(y[r], dtype=torch.int64)) for k, r in rows.items()}
    how = f"streamed from a memory-mapped file, {workers} loader workers" if streamed else "in memory"
    return DataSplits(**split, num_classes=len(classes), input_shape=shape, class_names=classes, is_image=len(shape) == 3,
                      description=f"{what} ({len(y)} examples of shape {list(shape)}, {SCALED[cfg.scaling]}, {how})",
                      preprocessing={"raw": f"{raw}, each example of shape {list(x.shape[1:])}", "layout": f"N, {', '.join(map(str, shape))}",
                                     "scaling": cfg.scaling, "steps": ([f"x / {divide:g}"] if divide != 1 else []) + steps,
                                     "streamed": streamed, **(extra or {})})


def _streamed(cfg: DataConfig, x: np.ndarray) -> bool:
    """data.stream, or by default: stream when the examples as float32 would take more than a quarter of this
    machine's memory (or x is already a file too large to copy)."""
    if cfg.stream is not None:
        return cfg.stream
    need = 4 * int(np.prod(x.shape))
    return need > os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def load_text(cfg: DataConfig, seed: int) -> DataSplits:
    """Labelled text (.csv / .jsonl), tokenised once (cached); test from data.test_path or a test_fraction split."""

    if not cfg.path:
        raise DataError("data.source is 'text' but data.path is empty; set data.path to a .csv or .jsonl file")
    files = [Path(cfg.path)] + ([Path(cfg.test_path)] if cfg.test_path else [])
    label = cfg.target or "label"
    parts, info = cached_tokenize(files, cfg.text, label, cfg.tokenizer, cfg.max_length, cfg.too_long, cfg.encoding)
    y, classes = label_ids(parts[0][1], None, cfg.path)
    require_two_classes(classes, cfg.path, label)
    roles = {"train": (parts[0][0], y)}
    if cfg.test_path:
        roles["test"] = (parts[1][0], label_ids(parts[1][1], classes, cfg.test_path)[0])
    return _text_splits(cfg, seed, roles, classes, info, f"text {cfg.path}")


def load_data(cfg: DataConfig, seed: int) -> DataSplits:
    loader = {"digits": load_digits_data, "fashion_mnist": load_fashion_mnist, "csv": load_csv, "arrays": load_arrays,
              "images": load_images, "hf_dataset": load_hf_dataset, "text": load_text, "lm_text": load_lm_corpus}[cfg.source]
    return loader(cfg, seed)
