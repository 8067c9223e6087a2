"""Labelled text from CSV or JSONL, tokenised once with a Hugging Face tokenizer and cached on disk.

Each example becomes a row of token ids padded with the tokenizer's pad id to the longest example (at most
``max_length``); models derive their attention mask from the pad id. The tokenised arrays are cached under
``$PROTEGE_CACHE`` (default ``~/.cache/protege``), keyed by the bytes of the data files and tokenizer files,
the columns and the length settings, so a second run reads them back instead of tokenising again.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..errors import DataError, ModelError
from ..logs import quiet_transformers
from .decode import read_text
from .labels import check_labels

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "merges.txt", "vocab.json",
                   "tokenizer.model", "added_tokens.json")


def cache_root() -> Path:
    return Path(os.environ.get("PROTEGE_CACHE", Path.home() / ".cache" / "protege"))


def read_rows(path: Path, encoding: str = "utf-8") -> list[dict]:
    """Rows of a .csv (header line) or .jsonl (one JSON object per line) file."""
    if not path.is_file():
        raise DataError(f"text file '{path}' not found; set data.path (and data.test_path) to a .csv or .jsonl file")
    if path.suffix not in (".jsonl", ".csv", ".tsv"):
        raise DataError(f"text file '{path}' has suffix '{path.suffix}'; use .csv, .tsv or .jsonl")
    text = read_text(path, encoding)
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise DataError(f"{path}: line {n} is not valid JSON; each line must be one JSON object") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}: line {n} is not a JSON object; each line must be {{\"text\": ..., \"label\": ...}}")
                rows.append(row)
        return rows
    return list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix == ".tsv" else ","))


def texts_and_labels(path: Path, text_col: str, label_col: str, encoding: str = "utf-8") -> tuple[list[str], list[str]]:
    rows = read_rows(path, encoding)
    if not rows:
        raise DataError(f"text file '{path}' has no rows; add examples")
    for col, field in ((text_col, "data.text"), (label_col, "data.target")):
        if col not in rows[0]:
            raise DataError(f"{path} has no column '{col}' ({field}); its columns are: {', '.join(map(str, rows[0]))}")
    texts = []
    first = 1 if path.suffix == ".jsonl" else 2  # a CSV's header is row 1
    for n, row in enumerate(rows, first):
        text = row.get(text_col)
        if text is None or not str(text).strip():
            raise DataError(f"{path}: row {n} has an empty '{text_col}'; remove the row or fill in its text")
        texts.append(str(text))
    raw = [row.get(label_col) for row in rows]
    check_labels(raw, str(path), label_col, first_row=first)
    return texts, [str(label).strip() for label in raw]


def load_tokenizer(folder: str):
    path = Path(folder)
    if not path.is_dir():
        raise ModelError(f"tokenizer folder '{folder}' not found; set data.tokenizer to a Hugging Face model folder")
    if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model")):
        raise ModelError(f"'{folder}' holds no tokenizer (tokenizer.json, vocab.txt or vocab.json); set data.tokenizer to "
                         f"the folder of the model whose tokenizer you use")
    with quiet_transformers():  # transformers and the torchao it imports log warnings at import
        from transformers import (
            AutoTokenizer,  # heavy: imported when a tokenizer is needed
        )

        tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:  # causal LM tokenizers often have none: padding is masked anyway
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_digest(folder: str) -> str:
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        f = Path(folder) / name
        if f.is_file():
            h.update(name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def tokenize(texts: list[str], tok, max_length: int, too_long: str, where: str) -> tuple[np.ndarray, int]:
    """Token ids (N, L) int32 padded to the longest row (L <= max_length); returns the ids and how many were truncated."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = tok(texts, add_special_tokens=True, truncation=False)["input_ids"]
        long = [i for i, e in enumerate(enc) if len(e) > max_length]
        if long and too_long == "error":
            raise DataError(f"{where}: {len(long)} of {len(enc)} texts are longer than data.max_length = {max_length} tokens "
                            f"(row {long[0] + 1} has {len(enc[long[0]])}); raise data.max_length (up to the model's limit) "
                            f"or set data.too_long: truncate")
        if long:
            cut = tok([texts[i] for i in long], add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
            for i, e in zip(long, cut):
                enc[i] = e
    width = max(len(e) for e in enc)
    ids = np.full((len(enc), width), tok.pad_token_id, dtype=np.int32)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = e
    return ids, len(long)


def cached_tokenize(files: list[Path], text_col: str, label_col: str, tokenizer: str, max_length: int,
                    too_long: str, encoding: str = "utf-8") -> tuple[list[tuple[np.ndarray, list[str]]], dict]:
    """(ids, labels) per file, tokenised once and cached; plus the tokenizer facts models need."""
    h = hashlib.sha256()
    for f in files:
        if not f.is_file():
            raise DataError(f"text file '{f}' not found; set data.path (and data.test_path) to a .csv or .jsonl file")
        h.update(f.read_bytes())
    h.update(json.dumps([text_col, label_col, tokenizer_digest(tokenizer), max_length, too_long]
                        + ([encoding] if encoding != "utf-8" else [])).encode())
    read = lambda: [(f, *texts_and_labels(f, text_col, label_col, encoding)) for f in files]  # noqa: E731
    return tokenize_cached(h.hexdigest()[:20], read, tokenizer, max_length, too_long)


def tokenize_cached(key: str, read: Callable[[], list[tuple[Any, list[str], list[str]]]], tokenizer: str, max_length: int,
                    too_long: str) -> tuple[list[tuple[np.ndarray, list[str]]], dict]:
    """(ids, labels) per part, from the cache folder ``key`` names, or else tokenised from ``read()`` (a list of
    (where, texts, labels)) and cached; plus the tokenizer facts models need."""
    folder = cache_root() / "tokens" / key
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        out = [(np.load(folder / f"ids{i}.npy"), labels) for i, labels in enumerate(meta["labels"])]
        return out, meta["tokenizer"]
    tok = load_tokenizer(tokenizer)
    limit = int(tok.model_max_length) if tok.model_max_length < 1_000_000 else None  # absent: a huge placeholder
    if limit is not None and max_length > limit:
        if too_long == "error":
            raise DataError(f"data.max_length = {max_length} is more than the {limit} tokens the model in '{tokenizer}' allows; "
                            f"lower data.max_length to {limit} or less (or set data.too_long: truncate)")
        warnings.warn(f"data.max_length = {max_length} is more than the {limit} tokens the model allows; using {limit}", stacklevel=2)
        max_length = limit
    out, truncated = [], 0
    for where, texts, labels in read():
        ids, n = tokenize(texts, tok, max_length, too_long, str(where))
        out.append((ids, labels))
        truncated += n
    if truncated:
        warnings.warn(f"data: {truncated} texts longer than data.max_length = {max_length} tokens were truncated "
                      f"(set data.too_long: error to refuse them instead)", stacklevel=2)
    info = {"vocab_size": len(tok), "pad_id": int(tok.pad_token_id), "truncated": truncated}
    folder.mkdir(parents=True, exist_ok=True)
    for i, (ids, _) in enumerate(out):
        np.save(folder / f"ids{i}.npy", ids)
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"labels": [labels for _, labels in out], "tokenizer": info}))
    os.replace(tmp, meta_path)
    return out, info


def label_ids(labels: list[str], classes: Optional[list[str]], where: str) -> tuple[np.ndarray, list[str]]:
    """Map label strings to class indices; classes sorted numerically when every label is an integer."""
    if classes is None:
        uniq = set(labels)
        classes = sorted(uniq, key=int) if all(_is_int(c) for c in uniq) else sorted(uniq)
    index = {c: i for i, c in enumerate(classes)}
    unknown = [lab for lab in labels if lab not in index]
    if unknown:
        raise DataError(f"{where}: label '{unknown[0]}' does not occur in the training file (classes: {', '.join(classes[:10])}); "
                        f"fix the label or add training examples of it")
    return np.array([index[lab] for lab in labels], dtype=np.int64), classes


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False
