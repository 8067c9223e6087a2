"""CSV tables: numeric and categorical columns, encoded by a scikit-learn ColumnTransformer fitted on the training
rows only (numeric: standardised, a missing cell the mean; categorical: one-hot, an unseen value all zeros)."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, MinMaxScaler, OneHotEncoder, StandardScaler

from ..errors import DataError
from .decode import read_text
from .labels import check_labels


def _is_number(v: str) -> bool:
    if v.strip() == "":
        return True  # missing value, imputed
    try:
        float(v)
        return True
    except ValueError:
        return False


@dataclass
class Encoder:
    width: int
    transform: Callable[[np.ndarray], np.ndarray]
    describe: dict  # the fitted encoding, for users of the exported files

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        return self.transform(rows)


@dataclass
class Table:
    path: Path
    columns: list[str]  # feature columns
    cells: list[list[str]]  # [row][feature column]
    labels: np.ndarray  # (N,) int64
    classes: list[str]
    rows: list[int]  # each data row's number in the file (the header is row 1; blank lines count)

    def _numeric_column(self, j: int, rows: np.ndarray) -> np.ndarray:
        out = np.empty(len(rows), dtype=np.float64)
        for k, r in enumerate(rows):
            v = self.cells[r][j].strip()
            try:
                out[k] = float(v) if v else np.nan
            except ValueError:
                raise DataError(f"{self.path}: column '{self.columns[j]}' row {self.rows[r]} holds text {v!r} but is numeric; "
                                f"list it under data.categorical or fix the value") from None
            if np.isinf(out[k]):
                raise DataError(f"{self.path}: column '{self.columns[j]}' row {self.rows[r]} holds {v!r}, an infinite number; "
                                f"replace it with a finite value or leave the cell empty (filled with the column mean)")
        return out

    def _matrix(self, rows: np.ndarray, numeric: list[int], categorical: list[int], missing: str = "mean") -> np.ndarray:
        """The rows as the encoder's input: the numeric columns parsed (a missing cell NaN, an error unless ``missing``
        is "mean"), then the categorical cells."""
        out = np.empty((len(rows), len(numeric) + len(categorical)), dtype=object)
        for k, j in enumerate(numeric):
            col = self._numeric_column(j, rows)
            if missing == "error" and np.isnan(col).any():
                r = int(rows[int(np.flatnonzero(np.isnan(col))[0])])
                raise DataError(f"{self.path}: row {self.rows[r]} column '{self.columns[j]}' is empty (or NaN); fill it in, remove "
                                f"the row, or set data.missing: mean to fill empty numeric cells with the column's training mean")
            out[:, k] = col
        for k, j in enumerate(categorical, start=len(numeric)):
            out[:, k] = [self.cells[r][j] for r in rows]
        return out

    def select(self, columns: Optional[list[str]], drop: list[str]) -> "Table":
        """The table with only ``columns`` (in that order; default: all) as features, less those in ``drop``."""
        for name in (columns or []) + drop:
            if name not in self.columns:
                field = "data.columns" if name in (columns or []) else "data.drop"
                raise DataError(f"{self.path}: column '{name}' in {field} is not a feature column of the file; its feature "
                                f"columns (the target left out): {', '.join(self.columns)}")
        keep = [c for c in (columns or self.columns) if c not in drop]
        if not keep:
            raise DataError(f"{self.path}: data.columns / data.drop leave no feature column; keep at least one of: "
                            f"{', '.join(self.columns)}")
        idx = [self.columns.index(c) for c in keep]
        return Table(self.path, keep, [[row[j] for j in idx] for row in self.cells], self.labels, self.classes, self.rows)

    def fit_encoder(self, train: np.ndarray, numeric: Optional[list[str]], categorical: Optional[list[str]],
                    scaling: str = "standardize", missing: str = "mean") -> Encoder:
        for name in (numeric or []) + (categorical or []):
            if name not in self.columns:
                raise DataError(f"{self.path}: column '{name}' (data.numeric / data.categorical) is not a feature column "
                                f"here (not in the file, or left out by data.columns / data.drop); feature columns: "
                                f"{', '.join(self.columns)}")
        cat = set(categorical or [])
        if numeric is None:
            num_idx = [j for j, c in enumerate(self.columns) if c not in cat and all(_is_number(self.cells[r][j]) for r in train)]
        else:
            num_idx = [self.columns.index(c) for c in numeric]
        cat_idx = [j for j in range(len(self.columns)) if j not in num_idx]
        vocab = [sorted({self.cells[r][j] for r in train}) for j in cat_idx]
        encoder = _column_transformer(len(num_idx), vocab, scaling)
        with np.errstate(divide="ignore", invalid="ignore"):  # a column with no value: NaN statistics, replaced below
            encoder.fit(self._matrix(train, num_idx, cat_idx, missing))
        stats = _numeric_statistics(encoder) if num_idx and scaling == "standardize" else []
        width = len(num_idx) + sum(len(v) for v in vocab)

        def transform(rows: np.ndarray) -> np.ndarray:
            if not width:
                return np.zeros((len(rows), 0), np.float32)
            return encoder.transform(self._matrix(rows, num_idx, cat_idx, missing)).astype(np.float32)

        describe = {"features_in_order": [f"{self.columns[j]} (numeric)" for j in num_idx]
                    + [f"{self.columns[j]} = {v!r} (one-hot)" for j, values in zip(cat_idx, vocab) for v in values],
                    "numeric": _numeric_description([self.columns[j] for j in num_idx], encoder, scaling, stats),
                    "scaling": scaling,
                    "steps": [f"numeric: {SCALING_STEP[scaling]}", "categorical: one-hot in the listed order, an unseen value all zeros"]}
        return Encoder(width, transform, describe)


def _column_major(x: np.ndarray) -> np.ndarray:
    """float64, column by column in memory: the scaler then sums each column as np.nanmean does (same bits)."""
    return np.asfortranarray(x, dtype=np.float64)


SCALING_STEP = {"standardize": "(x - mean) / std, a missing value becomes the mean",
                "minmax": "(x - min) / (max - min), a missing value becomes the mean of the scaled training values",
                "none": "as it is, a missing value becomes the mean"}


def _column_transformer(numeric: int, vocab: list[list[str]], scaling: str = "standardize") -> ColumnTransformer:
    """The first ``numeric`` input columns scaled (``standardize``: missing cells ignored by the fit, then set to 0,
    the mean; ``minmax``: to [0, 1] on the training rows; ``none``: as they are; a missing cell then the training
    mean), the rest one-hot over ``vocab`` (one sorted list of training values per column; an unseen value all zeros)."""
    if scaling == "standardize":
        scale = make_pipeline(FunctionTransformer(_column_major), StandardScaler(),
                              SimpleImputer(strategy="constant", fill_value=0.0, keep_empty_features=True))
    else:
        steps = [MinMaxScaler()] if scaling == "minmax" else []
        scale = make_pipeline(FunctionTransformer(_column_major), *steps,
                              SimpleImputer(strategy="mean", keep_empty_features=True))
    onehot = OneHotEncoder(categories=vocab, handle_unknown="ignore", sparse_output=False)
    return ColumnTransformer([("numeric", scale, list(range(numeric))),
                              ("categorical", onehot, list(range(numeric, numeric + len(vocab))))])


def _numeric_description(names: list[str], encoder: ColumnTransformer, scaling: str,
                         stats: list[tuple[float, float]]) -> dict[str, dict[str, float]]:
    """Per numeric column, what a user of the exported file needs to prepare its input the same way."""
    if scaling == "standardize":
        return {n: {"mean": mean, "std": std} for n, (mean, std) in zip(names, stats)}
    if not names:
        return {}
    steps = encoder.named_transformers_["numeric"].named_steps
    fill = steps["simpleimputer"].statistics_
    if scaling == "minmax":
        mm = steps["minmaxscaler"]
        return {n: {"min": float(lo), "max": float(hi), "missing": float(f)}
                for n, lo, hi, f in zip(names, mm.data_min_, mm.data_max_, fill)}
    return {n: {"missing": float(f)} for n, f in zip(names, fill)}


def _numeric_statistics(encoder: ColumnTransformer) -> list[tuple[float, float]]:
    """(mean, std) per numeric column from the fitted scaler (std 1 for a constant column); a column with no training
    value gets mean 0 and std 1, written back into the scaler, so that its held-out values pass through unscaled."""
    scaler = encoder.named_transformers_["numeric"].named_steps["standardscaler"]
    empty = np.broadcast_to(scaler.n_samples_seen_ == 0, scaler.mean_.shape)
    scaler.mean_ = np.where(empty, 0.0, scaler.mean_)
    scaler.scale_ = np.where(np.isfinite(scaler.scale_), scaler.scale_, 1.0)
    return [(float(m), float(s)) for m, s in zip(scaler.mean_, scaler.scale_)]


def read_csv_table(path: Path, target: str, encoding: str = "utf-8") -> Table:
    if not path.is_file():
        raise DataError(f"CSV file '{path}' not found; set data.path to an existing .csv file")
    try:
        rows = list(csv.reader(io.StringIO(read_text(path, encoding), newline="")))
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV ({e}); fix the quoting") from None
    if len(rows) < 2:
        raise DataError(f"{path}: needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    kept = [(n, r) for n, r in enumerate(rows[1:], 2) if any(c.strip() for c in r)]  # the file's row numbers, header 1
    numbers, body = [n for n, _ in kept], [r for _, r in kept]
    if target not in header:
        raise DataError(f"{path}: target column '{target}' not found; set data.target to one of: {', '.join(header)}")
    bad = next((i for i, r in enumerate(body) if len(r) != len(header)), None)
    if bad is not None:
        raise DataError(f"{path}: row {numbers[bad]} has {len(body[bad])} cells but the header has {len(header)}; fix the row")
    t = header.index(target)
    raw = [r[t].strip() for r in body]
    check_labels(raw, str(path), target, rows=numbers)
    classes = sorted(set(raw), key=lambda v: (float(v), v) if _is_number(v) and v else (float("inf"), v))
    index = {c: i for i, c in enumerate(classes)}
    cells = [[c for k, c in enumerate(r) if k != t] for r in body]
    return Table(path, [h for k, h in enumerate(header) if k != t], cells, np.array([index[v] for v in raw]), classes,
                 numbers)
