"""CSV tables: numeric and categorical columns, encoders fitted on the training rows only."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import DataError


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

    def _numeric_column(self, j: int, rows: np.ndarray) -> np.ndarray:
        out = np.empty(len(rows), dtype=np.float64)
        for k, r in enumerate(rows):
            v = self.cells[r][j].strip()
            try:
                out[k] = float(v) if v else np.nan
            except ValueError:
                raise DataError(f"{self.path}: column '{self.columns[j]}' row {r + 2} holds text {v!r} but is numeric; "
                                f"list it under data.categorical or fix the value") from None
            if np.isinf(out[k]):
                raise DataError(f"{self.path}: column '{self.columns[j]}' row {r + 2} holds {v!r}, an infinite number; "
                                f"replace it with a finite value or leave the cell empty (filled with the column mean)")
        return out

    def fit_encoder(self, train: np.ndarray, numeric: Optional[list[str]], categorical: Optional[list[str]]) -> Encoder:
        for name in (numeric or []) + (categorical or []):
            if name not in self.columns:
                raise DataError(f"{self.path}: column '{name}' named in the recipe is not in the file; columns: {', '.join(self.columns)}")
        cat = set(categorical or [])
        if numeric is None:
            num_idx = [j for j, c in enumerate(self.columns) if c not in cat and all(_is_number(self.cells[r][j]) for r in train)]
        else:
            num_idx = [self.columns.index(c) for c in numeric]
        cat_idx = [j for j in range(len(self.columns)) if j not in num_idx]
        stats = []
        for j in num_idx:
            col = self._numeric_column(j, train)
            mean = float(np.nanmean(col)) if np.isfinite(col).any() else 0.0
            std = float(np.nanstd(col)) if np.isfinite(col).any() else 1.0
            std = std if np.isfinite(std) and std > 0 else 1.0
            stats.append((j, mean, std))
        vocab = [(j, sorted({self.cells[r][j] for r in train})) for j in cat_idx]
        width = len(stats) + sum(len(v) for _, v in vocab)

        def transform(rows: np.ndarray) -> np.ndarray:
            parts = []
            for j, mean, std in stats:
                col = self._numeric_column(j, rows)
                parts.append(((np.where(np.isnan(col), mean, col) - mean) / std)[:, None])
            for j, values in vocab:
                index = {v: i for i, v in enumerate(values)}
                onehot = np.zeros((len(rows), len(values)))
                for k, r in enumerate(rows):
                    i = index.get(self.cells[r][j])  # unseen category -> all zeros
                    if i is not None:
                        onehot[k, i] = 1.0
                parts.append(onehot)
            return np.concatenate(parts, axis=1).astype(np.float32) if parts else np.zeros((len(rows), 0), np.float32)

        describe = {"features_in_order": [f"{self.columns[j]} (numeric)" for j, _, _ in stats]
                    + [f"{self.columns[j]} = {v!r} (one-hot)" for j, values in vocab for v in values],
                    "numeric": {self.columns[j]: {"mean": mean, "std": std} for j, mean, std in stats},
                    "steps": ["numeric: (x - mean) / std, a missing value becomes the mean",
                              "categorical: one-hot in the listed order, an unseen value all zeros"]}
        return Encoder(width, transform, describe)


def read_csv_table(path: Path, target: str) -> Table:
    if not path.is_file():
        raise DataError(f"CSV file '{path}' not found; set data.path to an existing .csv file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8 CSV") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV ({e}); fix the quoting") from None
    if len(rows) < 2:
        raise DataError(f"{path}: needs a header row and at least one data row")
    header, body = [h.strip() for h in rows[0]], [r for r in rows[1:] if any(c.strip() for c in r)]
    if target not in header:
        raise DataError(f"{path}: target column '{target}' not found; set data.target to one of: {', '.join(header)}")
    bad = next((i for i, r in enumerate(body) if len(r) != len(header)), None)
    if bad is not None:
        raise DataError(f"{path}: row {bad + 2} has {len(body[bad])} cells but the header has {len(header)}; fix the row")
    t = header.index(target)
    raw = [r[t].strip() for r in body]
    classes = sorted(set(raw), key=lambda v: (float(v), v) if _is_number(v) and v else (float("inf"), v))
    index = {c: i for i, c in enumerate(classes)}
    cells = [[c for k, c in enumerate(r) if k != t] for r in body]
    return Table(path, [h for k, h in enumerate(header) if k != t], cells, np.array([index[v] for v in raw]), classes)
