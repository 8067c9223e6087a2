"""Distilling across tokenizers: SmolLM2-135M (49,152-token BPE) teaches a small Llama with its own 4,096-token BPE.

    python benchmarks/lm_kd.py --runs seq_kd          # first: the teacher-written corpus (shared with lm_kd)
    python benchmarks/lm_cross_tokenizer.py           # the three runs below, about 15 minutes on 2 cores; resumable

The student's tokenizer is a byte-level BPE trained here on the training books only (the same split by book as
benchmarks/lm_kd.py); the student (4 layers, hidden 256, 4,096-token vocabulary) starts from random weights, since
no teacher layer fits it. Runs, at equal training tokens (320 blocks of 128 student tokens, 2 epochs, one optimiser):
- scratch: next-token CE on the KJV training books;
- uld: CE + ULD (Boizard et al. 2024; alpha 0.5, T 1) against the live teacher reading each block re-tokenised with
  its own tokenizer, positions paired;
- seq_kd: CE on the text the teacher wrote in lm_kd's seq_kd run (`protege generate`; 32 real tokens, 96 the teacher's).
All three are tested on the same test blocks (the test books in the student's tokens), so their per-token perplexities
compare; the teacher's, over another tokenizer, would not, and is not reported. Validation-selected epoch.
Writes benchmarks/results/lm_cross_tokenizer.{json,md}; per-run numbers in benchmarks/results/lm_cross_tokenizer/.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
sys.path.insert(0, str(ROOT))
from _env import environment  # noqa: E402
from lm_kd import CORPUS, RECIPE, TEACHER_DIR  # noqa: E402

from protege.logs import setup as setup_logging  # noqa: E402
from protege import distill, load_recipe  # noqa: E402

RESULTS = ROOT / "results" / "lm_cross_tokenizer"
STUDENT = {"vocab": 4096, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024}
RUNS = {"scratch": ["distill.alpha=1.0"], "uld": ["distill.response=uld", "distill.alpha=0.5", "distill.temperature=1.0"],
        "seq_kd": ["distill.alpha=1.0"]}


def split_books(seed: int) -> dict[str, list[str]]:
    """The KJV books in lm_kd's split (load_lm_corpus: a seeded permutation, test first, then validation)."""
    import numpy as np

    from protege.data.lm import read_documents

    d = load_recipe(RECIPE).data
    books = read_documents(CORPUS, d.text)
    order = np.random.default_rng(seed).permutation(len(books))
    n_test, n_val = max(1, round(d.test_fraction * len(books))), max(1, round(d.val_fraction * len(books)))
    parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    return {k: [books[i] for i in sorted(v)] for k, v in parts.items()}


def student_folder(out: Path, seed: int) -> Path:
    """A 4,096-token byte-level BPE trained on the training books, and a Llama config, as a model folder (no weights)."""
    folder = out / "student_model"
    if (folder / "config.json").is_file():
        return folder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=STUDENT["vocab"], special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(split_books(seed)["train"], trainer)
    tmp = out / "student_model.tmp"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>").save_pretrained(str(tmp))
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=STUDENT["hidden_size"], num_hidden_layers=STUDENT["num_hidden_layers"],
                      num_attention_heads=STUDENT["num_attention_heads"], num_key_value_heads=STUDENT["num_attention_heads"],
                      intermediate_size=STUDENT["intermediate_size"], max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=0, pad_token_id=0)
    cfg.save_pretrained(str(tmp))
    tmp.rename(folder)
    return folder


def run_one(name: str, out: Path, student: Path) -> dict:
    done = RESULTS / f"{name}.json"
    if done.is_file():
        return json.loads(done.read_text())
    sets = [f"data.tokenizer={student}", f"student.model={student}", "student.init=null", "student.init_every=null",
            "student.kwargs={pretrained: false}", "train.lr=1.0e-3", *RUNS[name], "distill.topk=null"]
    if name == "seq_kd":
        gen = ROOT / "runs" / "lm_kd" / "seq_kd_data"
        if not (gen / "teacher_text.jsonl").is_file():
            raise SystemExit(f"{gen / 'teacher_text.jsonl'} is missing: run `python benchmarks/lm_kd.py --runs seq_kd` first")
        sets += [f"data.path={gen / 'teacher_text.jsonl'}", f"data.test_path={gen / 'test_books.jsonl'}"]
    recipe = load_recipe(RECIPE, sets)
    run_dir = out / name
    resume = (run_dir / "recipe.yaml").is_file()
    print(f"== {name}", flush=True)
    run = distill(recipe, run_dir, resume=resume, overwrite=not resume)
    rows = [json.loads(x) for x in run.metrics_path.read_text().splitlines()]
    result = {"run": name, "overrides": sets, "teacher": run.report.to_json()["teacher"], "student": run.report.to_json()["student"],
              "epoch_time_s": statistics.median(r["epoch_time_s"] for r in rows if r["stage"] == "student"),
              "best_epoch": json.loads((run_dir / "student" / "config.json").read_text())["best_epoch"],
              "test_blocks_digest": __import__("hashlib").sha256(_test_blocks(recipe).numpy().tobytes()).hexdigest()[:16]}
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result, indent=2))
    return result


def _test_blocks(recipe) -> torch.Tensor:
    from protege.data import load_data

    return load_data(recipe.data, recipe.seed).test.x


def main() -> None:
    setup_logging()  # protege's progress and stage messages on stdout, as the CLI shows them
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "lm_cross_tokenizer")
    args = ap.parse_args()
    os.chdir(REPO)
    if not (TEACHER_DIR / "config.json").is_file() or not CORPUS.is_file():
        raise SystemExit("run `python benchmarks/lm_kd.py --prepare` first (the teacher folder and the KJV corpus)")
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    student = student_folder(args.out, load_recipe(RECIPE).seed)
    for name in args.runs:
        run_one(name, args.out, student)
    results = {n: json.loads((RESULTS / f"{n}.json").read_text()) for n in RUNS if (RESULTS / f"{n}.json").is_file()}
    digests = {r["test_blocks_digest"] for r in results.values()}
    if len(digests) != 1:
        raise SystemExit(f"the runs were tested on different blocks ({digests}); their perplexities do not compare")
    base = results.get("scratch", {}).get("student", {}).get("test_ppl")
    rows = {n: {"test_ppl": r["student"]["test_ppl"], "vs_scratch": (r["student"]["test_ppl"] / base - 1) if base else None,
                "params": r["student"]["params"], "tokens_per_s": r["student"]["tokens_per_s"], "best_epoch": r["best_epoch"],
                "epoch_time_s": r["epoch_time_s"]} for n, r in results.items()}
    teacher = next(iter(results.values()))["teacher"]
    recipe = load_recipe(RECIPE)
    summary = {"command": "python benchmarks/lm_cross_tokenizer.py", "environment": environment(2),
               "setting": {"student": STUDENT, "training_tokens": recipe.data.limit * recipe.data.block_size * recipe.train.epochs,
                           "selection": "validation-selected epoch; test blocks of the test books in the student's tokens"},
               "teacher": {k: teacher.get(k) for k in ("params", "bytes", "tokens_per_s", "note")}, "runs": rows}
    e = summary["environment"]
    md = [f"Cross-tokenizer distillation, `{summary['command']}` ({e['cpu']}; torch {e['torch']}, {e['threads']} threads; "
          f"{summary['setting']['training_tokens']:,} training tokens per run). Teacher SmolLM2-135M ({teacher['params']:,} params, "
          f"49,152-token BPE); student a {STUDENT['num_hidden_layers']}-layer Llama with its own {STUDENT['vocab']:,}-token BPE, "
          f"from random weights.", "",
          "| run | test ppl (student tokens) | vs scratch | params | tokens/s | best epoch | s / epoch |", "|---|---:|---:|---:|---:|---:|---:|"]
    for n, r in rows.items():
        vs = "" if n == "scratch" or r["vs_scratch"] is None else f"{100 * r['vs_scratch']:+.1f}%"
        md.append(f"| {n} | {r['test_ppl']:.2f} | {vs} | {r['params']:,} | {r['tokens_per_s']:.1f} | {r['best_epoch']} | {r['epoch_time_s']:.0f} |")
    md += ["", "Per-token perplexities compare between these runs (one tokenizer, the same test blocks), not with the teacher's. "
           "seq_kd picks its epoch on teacher-written validation text; scratch and uld on real books."]
    (ROOT / "results" / "lm_cross_tokenizer.json").write_text(json.dumps(summary, indent=2))
    (ROOT / "results" / "lm_cross_tokenizer.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
