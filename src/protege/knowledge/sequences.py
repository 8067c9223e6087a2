"""Sequence-level knowledge: text the teacher writes (Kim & Rush 2016, "Sequence-Level Knowledge Distillation").

The teacher continues prompts cut from a corpus; the continuations, decoded to plain text, become a new corpus a
student learns with ordinary next-token cross-entropy. Because what passes between the models is text, not token
ids, the student may use any tokenizer (the way to distil across tokenizers without a cross-tokenizer loss).

Each document of the prompt file is tokenised with the teacher's tokenizer and cut into windows of
``prompt_tokens + new_tokens`` tokens; the first ``prompt_tokens`` of each window are a prompt, and the teacher
writes ``new_tokens`` after it (sampled at ``temperature``, or greedy at 0). Batches are seeded by their index, so an
interrupted run continues from its last finished batch and gives the same file as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

import torch

from ..data.lm import read_documents
from ..data.text import load_tokenizer
from ..errors import DataError, ModelError
from ..logs import progress
from ..models.lm import causal_lm

log = logging.getLogger(__name__)


def _prompts(docs: list[str], tok, prompt_tokens: int, window: int, limit: Optional[int]) -> list[tuple[int, list[int]]]:
    """(document index, the first ``prompt_tokens`` ids of each ``window``-token piece) over every document."""
    out = []
    for d, text in enumerate(docs):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out += [(d, ids[i:i + prompt_tokens]) for i in range(0, len(ids) - prompt_tokens + 1, window)]
        if limit is not None and len(out) >= limit:
            return out[:limit]
    return out


def _finished_rows(tmp: Path, batch_size: int) -> list[str]:
    """The rows an interrupted run wrote, cut back to whole batches (a batch is seeded as a unit)."""
    if not tmp.is_file():
        return []
    rows = tmp.read_bytes().decode("utf-8", errors="replace").split("\n")[:-1]  # a torn last line (no newline) is dropped
    return rows[: len(rows) // batch_size * batch_size]


def generate_corpus(teacher: str | Path, prompts: str | Path, out: str | Path, *, column: str = "text", prompt_tokens: int = 32,
                    new_tokens: int = 96, temperature: float = 1.0, batch_size: int = 8, limit: Optional[int] = None,
                    seed: int = 0, overwrite: bool = False, allow_pickle: bool = False) -> Path:
    """Write ``out`` (.jsonl, one row per prompt: ``column`` = prompt + continuation as text, ``document`` = the index of
    the prompt's document among the non-empty ones) with the causal LM in the folder ``teacher``. Returns ``out``;
    ``out``.tmp holds the rows while it runs. Generation runs on the CPU."""

    out = Path(out)
    for name, value, low in (("prompt_tokens", prompt_tokens, 1), ("new_tokens", new_tokens, 1), ("batch_size", batch_size, 1)):
        if value < low:
            raise DataError(f"{name} is {value}; give an integer of at least {low}")
    if temperature < 0:
        raise DataError(f"temperature is {temperature}; give 0 (greedy) or a positive number")
    if limit is not None and limit < 1:
        raise DataError(f"limit is {limit}; give a positive number of prompts, or none for all")
    if out.suffix != ".jsonl":
        raise DataError(f"output '{out}' must end in .jsonl (one JSON object per line)")
    if out.exists() and not overwrite:
        raise DataError(f"'{out}' already exists; choose another output file or pass --overwrite")
    docs = read_documents(Path(prompts), column)
    tok = load_tokenizer(str(teacher))
    model = causal_lm(str(teacher), allow_pickle=allow_pickle).eval()
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and prompt_tokens + new_tokens > positions:
        raise ModelError(f"the teacher ({teacher}) reads at most {positions} tokens but prompt_tokens + new_tokens is "
                         f"{prompt_tokens + new_tokens}; lower them")
    todo = _prompts(docs, tok, prompt_tokens, prompt_tokens + new_tokens, limit)
    if not todo:
        raise DataError(f"no document of '{prompts}' has {prompt_tokens} tokens for a prompt; lower prompt_tokens")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, key_file = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".tmp.json")
    weights = sorted(f for f in Path(teacher).iterdir() if f.suffix in (".safetensors", ".bin", ".json"))
    key = {"teacher": str(Path(teacher).resolve()),  # and its files' sizes and times: other weights never continue a file
           "teacher_files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in weights], "prompts": hashlib.sha256(Path(prompts).read_bytes()).hexdigest()[:16],
           "column": column, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "temperature": temperature,
           "batch_size": batch_size, "limit": limit, "seed": seed}
    same = key_file.is_file() and json.loads(key_file.read_text()) == key
    if tmp.exists() and not same:
        log.info(f"generate: {tmp} was written with other settings; starting again")
        tmp.unlink()
    key_file.write_text(json.dumps(key))
    done = _finished_rows(tmp, batch_size)
    if done:
        log.info(f"generate: continuing {tmp} after {len(done)} finished rows")
    if tmp.exists():  # keep the whole batches already written; drop a torn or partial tail
        os.truncate(tmp, sum(len(row.encode("utf-8")) + 1 for row in done))
    with tmp.open("a", encoding="utf-8", newline="\n") as f:
        start, n_new = time.perf_counter(), 0
        batches = range(len(done), len(todo), batch_size)
        for b in progress(batches, "generate", logger=log):
            chunk = todo[b:b + batch_size]
            torch.manual_seed(seed * 1_000_003 + b)  # each batch seeded by its position: a resumed run writes the same rows
            prompt = torch.tensor([ids for _, ids in chunk], dtype=torch.long)
            seq = model.generate(prompt, new_tokens, sample=temperature > 0, temperature=temperature or 1.0)
            for (d, _), row in zip(chunk, seq.tolist()):
                text = tok.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                f.write(json.dumps({column: text, "document": d}) + "\n")
            f.flush()
            n_new += len(chunk) * new_tokens
        took = time.perf_counter() - start
    os.replace(tmp, out)
    key_file.unlink()
    log.info(f"generate: {len(todo)} texts of {prompt_tokens} prompt + {new_tokens} teacher tokens -> {out} "
        f"({n_new / max(took, 1e-9):.0f} new tokens/s this run)")
    return out
