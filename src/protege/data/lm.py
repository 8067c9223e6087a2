"""A language-modelling corpus: documents split into train / validation / test (whole documents, seeded, so no
text leaks between splits), tokenised once (cached), joined with the end-of-text token and cut into blocks.

``data.test_path`` names a separate test corpus (all its documents); ``data.path`` then gives train and validation.
Documents are the rows of a .jsonl / .csv file (the ``data.text`` column; e.g. one book of the Bible per row)
or the paragraphs (blank-line separated) of a .txt file. Each split is a (N, block_size) tensor of token ids;
``Split.y`` holds the same blocks (the next-token labels are the ids shifted by one).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .base import DataSplits, Split
from .config import DataConfig
from .decode import read_text
from .text import cache_root, load_tokenizer, read_rows, tokenizer_digest


def read_documents(path: Path, column: str, field: str = "data.path", encoding: str = "utf-8") -> list[str]:
    if not path.is_file():
        raise DataError(f"corpus file '{path}' not found; set {field} to a .txt, .jsonl or .csv file")
    if path.suffix == ".txt":
        docs = [d.strip() for d in read_text(path, encoding).split("\n\n")]
    else:
        rows = read_rows(path, encoding)
        if rows and column not in rows[0]:
            raise DataError(f"{path} has no column '{column}' (data.text); its columns are: {', '.join(map(str, rows[0]))}")
        docs = [str(r.get(column) or "").strip() for r in rows]
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(f"corpus file '{path}' holds no text; add documents (rows, or paragraphs of a .txt)")
    return docs


def _tokenised(path: Path, cfg: DataConfig, field: str = "data.path") -> tuple[list[np.ndarray], dict]:
    """Token ids of every document, cached by the file's bytes, the column and the tokenizer."""
    h = hashlib.sha256(path.read_bytes() if path.is_file() else b"")
    h.update(json.dumps([cfg.text, tokenizer_digest(cfg.tokenizer), "lm"] + ([cfg.encoding] if cfg.encoding != "utf-8" else [])).encode())
    folder = cache_root() / "lm_tokens" / h.hexdigest()[:20]
    if (folder / "meta.json").is_file():
        meta = json.loads((folder / "meta.json").read_text())
        flat = np.load(folder / "ids.npy")
        return np.split(flat, np.cumsum(meta["lengths"])[:-1]), meta["tokenizer"]
    docs = read_documents(path, cfg.text, field, cfg.encoding)
    tok = load_tokenizer(cfg.tokenizer)
    if tok.eos_token_id is None:
        raise DataError(f"the tokenizer in '{cfg.tokenizer}' has no end-of-text token to join documents with; use a causal LM's tokenizer")
    ids = [np.asarray(tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id], dtype=np.int32) for d in docs]
    info = {"vocab_size": len(tok), "pad_id": int(tok.pad_token_id), "eos_id": int(tok.eos_token_id)}
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "ids.npy", np.concatenate(ids))
    tmp = folder / "meta.tmp"
    tmp.write_text(json.dumps({"lengths": [len(i) for i in ids], "tokenizer": info}))
    os.replace(tmp, folder / "meta.json")
    return ids, info


def _blocks(docs: list[np.ndarray], size: int) -> torch.Tensor:
    flat = np.concatenate(docs) if docs else np.zeros(0, np.int32)
    n = len(flat) // size
    return torch.from_numpy(flat[: n * size].astype(np.int64)).view(n, size)


def load_lm_corpus(cfg: DataConfig, seed: int) -> DataSplits:
    """Blocks of ``data.block_size`` tokens per split; ``data.limit`` caps the training blocks (equal training tokens),
    ``data.eval_limit`` the validation and test blocks."""
    if not cfg.path:
        raise DataError("data.source is 'lm_text' but data.path is empty; set data.path to the corpus file")
    docs, info = _tokenised(Path(cfg.path), cfg)
    if len(docs) < (2 if cfg.test_path else 3):
        raise DataError(f"'{cfg.path}' has {len(docs)} document(s); a train / validation / test split by document needs at "
                        f"least 3 (2 with data.test_path) (rows of a .jsonl / .csv, or blank-line separated paragraphs of a .txt)")
    order = np.random.default_rng(seed).permutation(len(docs))
    n_test = 0 if cfg.test_path else max(1, round(cfg.test_fraction * len(docs)))
    n_val = max(1, round(cfg.val_fraction * len(docs)))
    parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    test_docs = None
    if cfg.test_path:  # a separate test file: e.g. a student trained on teacher-written text, tested on real text
        test_docs = _tokenised(Path(cfg.test_path), cfg, field="data.test_path")[0]
    splits = {}
    for name, idx in parts.items():
        source = test_docs if name == "test" and test_docs is not None else [docs[i] for i in sorted(idx)]
        blocks = _blocks(source, cfg.block_size)
        if len(blocks) == 0:
            where = cfg.test_path if source is test_docs else cfg.path
            raise DataError(f"the {name} split of '{where}' holds fewer than data.block_size = {cfg.block_size} tokens; "
                            f"lower data.block_size or give more text")
        cap = cfg.limit if name == "train" else cfg.eval_limit
        if cap is not None and cap < len(blocks):
            keep = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))[:cap]
            blocks = blocks[keep.sort().values]
        splits[name] = Split(blocks, blocks)
    return DataSplits(**splits, num_classes=info["vocab_size"], input_shape=(cfg.block_size,),
                      description=f"corpus {cfg.path} ({len(docs)} documents"
                      + (f"; test: {cfg.test_path}, {len(test_docs)} documents" if test_docs is not None else "")
                      + f", blocks of {cfg.block_size} tokens)",
                      vocab_size=info["vocab_size"], pad_id=info["pad_id"], is_lm=True,
                      preprocessing={"tokenizer": cfg.tokenizer, "block_size": cfg.block_size, "dtype": "int64 token ids"})


def split_at(ids: list[int], sep: int) -> list[list[int]]:
    """The runs of ``ids`` between occurrences of ``sep`` (k separators give k + 1 runs, some maybe empty)."""
    pieces: list[list[int]] = [[]]
    for t in ids:
        if t == sep:
            pieces.append([])
        else:
            pieces[-1].append(t)
    return pieces


def retokenize(blocks: torch.Tensor, src, dst, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same text in another tokenizer (for ULD's teacher): each row of ``src`` ids is decoded piece by piece
    between end-of-text tokens, the pieces encoded with ``dst`` and joined with its end-of-text token, cut to ``length``
    tokens and padded with its pad id. Returns the ids (N, length) and each row's real length (N,)."""
    for tok, who in ((src, "data.tokenizer"), (dst, "the teacher's tokenizer")):
        if tok.eos_token_id is None:
            raise DataError(f"{who} has no end-of-text token to mark where documents meet; use a causal LM's tokenizer")
    ids = torch.full((len(blocks), length), int(dst.pad_token_id), dtype=torch.long)
    lengths = torch.zeros(len(blocks), dtype=torch.long)
    for n, row in enumerate(blocks.tolist()):
        out: list[int] = []
        for i, piece in enumerate(split_at(row, src.eos_token_id)):  # joined again by the other end-of-text token
            if i:
                out.append(int(dst.eos_token_id))
            if piece:
                out += dst(src.decode(piece, clean_up_tokenization_spaces=False), add_special_tokens=False)["input_ids"]
        out = out[:length]
        ids[n, : len(out)] = torch.tensor(out, dtype=torch.long)
        lengths[n] = len(out)
    return ids, lengths
