"""Results do not move: fixed-seed runs through the command line, compared number for number and tensor for tensor
with the same runs of a reference commit (issue 15's redesign had to leave every result as it was).

    python benchmarks/identity.py                          # this tree vs the reference commit, both run here, now
    python benchmarks/identity.py --reference 1de8a87      # another reference commit
    python benchmarks/identity.py --cases demo kd dkd      # a subset
    python benchmarks/identity.py --quick                  # every case but the 70-epoch demo (about 3 minutes)
    python benchmarks/identity.py --repo ../protege        # this tree is no git checkout: the reference from there

Each case is a `protege` command line (the CLI is the interface both versions share) on the bundled digits, a tiny
BERT text set, a tiny Llama corpus made by tests/text_fixtures.py or a CSV table made here from scikit-learn's
bundled wine data (missing cells, an empty and a constant column, a categorical column). The reference commit is
checked out into a git worktree and run with the same Python, on the same CPU, in the same invocation, so the
comparison holds on any machine (float results depend on the instruction set; see ../shared/DATA.md). What is compared, per case:
  * every model tensor of the run's safetensors files (teacher, student, pruned student): sha256 of the bytes. A tied
    tensor (a language model's input and output embeddings) is stored once, under a key that depends on the writer
    (safetensors' save_model keeps the first in sorted order and names the others in the file's metadata; protege
    before it kept the first in state-dict order): keys a file's metadata declares one tensor are compared as one;
  * every accuracy, macro-F1, agreement and perplexity figure and parameter count in report.json;
  * the input description stamped into every ONNX file (shape, dtype and preprocessing, e.g. a CSV's means and stds):
    every key the reference writes, with the same value (this tree may add keys, as later features do);
Latency, file sizes and timestamps are not compared (they are measurements, or depend on file metadata).
Writes benchmarks/results/identity.json with the figures, the verdict per case and the environment.
Exit status 1 if any case differs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))  # this tree's protege, whatever the virtualenv points at
from _env import environment  # noqa: E402

REFERENCE = "1de8a87"  # main before the redesign (issue 15)
QUICK = ["train.epochs=3", "teacher.train.epochs=3"]
FEATURES = "distill.features=[{loss: hint, student: features.1, teacher: features.1, weight: 1.0}]"

# name -> (recipe or a builder key, --set overrides, extra commands run after distill on the same folder)
CASES: dict[str, tuple[str, list[str], list[list[str]]]] = {
    "teacher_kd": ("recipes/digits.yaml", QUICK, []),
    "scratch": ("recipes/digits.yaml", ["train.epochs=3", "teacher.weights={T}", "teacher.train=null", "distill.alpha=1.0"], []),
    "kd": ("recipes/digits.yaml", ["train.epochs=3", "teacher.weights={T}", "teacher.train=null"], []),
    "soft_only": ("recipes/digits.yaml", ["train.epochs=3", "teacher.weights={T}", "teacher.train=null", "distill.alpha=0.0"], []),
    "mse_prob": ("recipes/digits.yaml", ["train.epochs=3", "teacher.weights={T}", "teacher.train=null", "distill.response=mse_prob"], []),
    "dkd": ("recipes/digits.yaml", ["train.epochs=3", "teacher.weights={T}", "teacher.train=null", "distill.response=dkd"], []),
    "features": ("recipes/digits_features.yaml", ["train.epochs=3", "teacher.weights={T}", "teacher.train=null"], []),
    "fitnets_augment": ("recipes/digits.yaml", ["train.epochs=2", "teacher.weights={T}", "teacher.train=null", FEATURES,
                                                "train.augment=true"], []),
    "two_teachers": ("recipes/digits.yaml", ["train.epochs=3", "teacher.weights={T}", "teacher.train=null",
                                             "more_teachers=[{model: cnn, kwargs: {channels: [32, 64, 128], depth: 2}, weights: {T}}]",
                                             "distill.combine=confidence"], []),
    "born_again": ("recipes/digits_born_again.yaml", ["train.epochs=2", "teacher.train.epochs=2"], []),
    "init_select": ("recipes/digits.yaml", ["train.epochs=3", "teacher.weights={T}", "teacher.train=null", "student.init=select"], []),
    "ema_self": ("recipes/digits_self_distill.yaml", ["train.epochs=3"], []),
    "compress": ("recipes/digits.yaml", ["train.epochs=3", "teacher.weights={T}", "teacher.train=null"],
                 [["compress", "{RUN}", "--prune", "0.5", "--finetune-epochs", "1"],
                  ["compress", "{RUN}", "--quantize", "qat"]]),
    "unstructured_dynamic": ("recipes/digits.yaml", ["train.epochs=2", "teacher.weights={T}", "teacher.train=null"],
                             [["compress", "{RUN}", "--prune", "0.3", "--unstructured", "--finetune-epochs", "1",
                               "--quantize", "dynamic"]]),
    "text": ("text", [], []),
    "lm": ("lm", [], [["export", "{RUN}"]]),
    "csv": ("csv", [], []),
    "demo": ("demo", [], []),
}
# --set items a later version needs to do what the reference did by default, given only to versions that know the
# field (data.missing: since issue 16 an empty CSV cell is an error unless filling is asked for)
LATER_DEFAULTS: dict[str, list[tuple[str, str]]] = {"csv": [("data.missing=mean", "missing:")]}
# cases whose results were changed on purpose after the redesign, and why: reported, not counted as failures
KNOWN_CHANGES = {"fitnets_augment": "issue 16: image augmentation through kornia (other random crops and flips)",
                 "text": "issue 16: text batches cut to their longest text (a masked BERT: the same sums over shorter "
                         "matrices, so float rounding moves; measured: every accuracy figure unchanged)"}
DEPENDS = {"teacher_kd"}  # cases whose teacher file the others read ({T})
NUMBERS = ("accuracy", "macro_f1", "agreement", "test_ppl", "test_loss", "params", "test_examples", "test_tokens",
           "compression_ratio", "onnx_max_abs_diff", "chosen")


def write_wine_table(path: Path) -> Path:
    """scikit-learn's wine data as a CSV file the tabular encoder has to work for: about 3% of the numeric cells
    empty, a column with no value at all, a constant column and a categorical column (with a rare value that may be
    unseen in training); the label is the cultivar's name. Seeded, so every invocation writes the same bytes."""
    import csv

    import numpy as np
    from sklearn.datasets import load_wine

    wine = load_wine()
    rng = np.random.default_rng(0)
    cellars = ["north", "south", "east", "west"]
    names = ["barolo", "grignolino", "barbera"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(wine.feature_names) + ["lab_note", "batch", "cellar", "cultivar"])
        for i, (x, y) in enumerate(zip(wine.data, wine.target)):
            cells = ["" if rng.random() < 0.03 else repr(float(v)) for v in x]
            cellar = "island" if i % 59 == 7 else cellars[int(rng.integers(len(cellars)))]
            w.writerow(cells + ["", "1", cellar, names[y]])
    return path


def fixtures(folder: Path) -> dict[str, Path]:
    """The text, LM and CSV inputs (made once per invocation; both versions read the same files)."""
    from tests.text_fixtures import write_bert_folder, write_corpus, write_llama_folder, write_text_data

    folder.mkdir(parents=True, exist_ok=True)
    return {"bert": write_bert_folder(folder / "bert", layers=2), "reviews": write_text_data(folder / "reviews.csv"),
            "llama": write_llama_folder(folder / "llama"), "corpus": write_corpus(folder / "corpus.jsonl"),
            "wine": write_wine_table(folder / "wine.csv")}


def recipe_file(kind: str, fx: dict[str, Path], folder: Path) -> Path:
    """A small recipe for the text, LM and CSV cases (written as YAML, read by both versions' CLI)."""
    import yaml

    if kind == "csv":
        r = {"name": "csv", "seed": 0, "data": {"source": "csv", "path": str(fx["wine"]), "target": "cultivar",
                                                "categorical": ["cellar"]},
             "teacher": {"model": "mlp", "kwargs": {"hidden": [64]}, "train": {"epochs": 5, "batch_size": 16}},
             "student": {"model": "mlp", "kwargs": {"hidden": [16]}},
             "distill": {"response": "kl", "temperature": 2.0, "alpha": 0.5},
             "train": {"epochs": 5, "batch_size": 16, "lr": 0.01}, "eval": {"threads": 1, "repeats_b1": 2, "repeats_b32": 1,
                                                                            "rounds": 1, "warmup": 0}}
    elif kind == "text":
        r = {"name": "text", "seed": 0, "data": {"source": "text", "path": str(fx["reviews"]), "max_length": 16},
             "teacher": {"model": str(fx["bert"])}, "student": {"model": str(fx["bert"]), "kwargs": {"num_hidden_layers": 1}},
             "distill": {"response": "kl", "temperature": 2.0, "alpha": 0.5,
                         "features": [{"loss": "cosine", "student": "hidden.1", "teacher": "hidden.2", "weight": 1.0}]},
             "train": {"epochs": 2, "batch_size": 16, "lr": 3e-3}, "eval": {"threads": 1, "repeats_b1": 2, "repeats_b32": 1,
                                                                          "rounds": 1, "warmup": 0}}
    else:
        r = {"name": "lm", "task": "causal_lm", "seed": 0,
             "data": {"source": "lm_text", "path": str(fx["corpus"]), "block_size": 32, "val_fraction": 0.2, "test_fraction": 0.2},
             "teacher": {"model": str(fx["llama"])},
             "student": {"model": str(fx["llama"]), "kwargs": {"pretrained": False, "num_hidden_layers": 2}},
             "distill": {"response": "forward_kl", "temperature": 1.0, "alpha": 0.5},
             "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3}, "eval": {"threads": 1, "rounds": 1, "warmup": 0}}
    path = folder / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


def tensor_digests(run: Path) -> tuple[dict[str, str], dict[str, str]]:
    """sha256 of every tensor in the run's model files (not checkpoints: those hold optimiser state too), and the
    tied keys the files left out ({"file:alias": "file:kept key"}, from the metadata safetensors' save_model writes)."""
    import torch
    from safetensors import safe_open

    out, aliases = {}, {}
    for f in sorted(run.rglob("*.safetensors")):
        rel = f.relative_to(run)
        if any(part.endswith("checkpoints") for part in rel.parts) or "teacher_cache" in rel.parts:
            continue
        with safe_open(str(f), framework="pt") as st:
            keys = set(st.keys())
            for k in sorted(keys):
                t = st.get_tensor(k).contiguous()
                data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
                out[f"{rel}:{k}"] = f"{hashlib.sha256(data).hexdigest()[:16]}:{t.dtype}:{tuple(t.shape)}"
            aliases.update({f"{rel}:{a}": f"{rel}:{kept}" for a, kept in (st.metadata() or {}).items()
                            if kept in keys and a not in keys})
    return out, aliases


def onnx_inputs(run: Path) -> dict[str, Any]:
    """The protege.input metadata of every ONNX file of the run (what a user feeds the file, and how), parsed."""
    import onnx

    out = {}
    for f in sorted(run.rglob("*.onnx")):
        meta = {p.key: p.value for p in onnx.load(str(f), load_external_data=False).metadata_props}
        out[f"{f.relative_to(run)}:protege.input"] = json.loads(meta.get("protege.input") or "null")
    return out


def holds(reference: Any, this: Any) -> bool:
    """Whether ``this`` says everything ``reference`` says, with the same values; it may say more (a key later
    versions add, such as the CSV's scaling)."""
    if isinstance(reference, dict):
        return isinstance(this, dict) and all(k in this and holds(v, this[k]) for k, v in reference.items())
    return reference == this


def report_numbers(run: Path) -> dict:
    """The result figures of report.json (recursively, by key path); no latency, no sizes."""
    path = run / "report.json"
    if not path.is_file():
        return {}
    out = {}

    def walk(v, where: str) -> None:
        if isinstance(v, dict):
            name = v.get("name")
            for k, x in v.items():
                if k in ("latency", "environment", "notes"):
                    continue
                walk(x, f"{where}.{name}.{k}" if name and k != "name" and where.endswith("stages") else f"{where}.{k}")
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(x, f"{where}" if isinstance(x, dict) and "name" in x else f"{where}[{i}]")
        elif where.rsplit(".", 1)[-1] in NUMBERS:
            out[where.lstrip(".")] = v

    walk(json.loads(path.read_text()), "")
    return out


def run_version(src: Path, case: str, work: Path, fx: dict[str, Path], teacher: Path | None) -> dict:
    """One case with the protege in ``src`` (its src/ folder first on the path); returns its figures."""
    recipe, sets, after = CASES[case]
    run = work / case
    work.mkdir(parents=True, exist_ok=True)  # a case run on its own: no earlier case made the folder
    env = {**os.environ, "PYTHONPATH": str(src / "src"), "OMP_NUM_THREADS": "2", "PYTHONHASHSEED": "0"}
    cli = [sys.executable, "-c", "import sys; from protege_entry import main; sys.argv[0] = 'protege'; main()"]
    if recipe == "demo":
        commands = [cli + ["demo", "--out", str(run), "--overwrite"]]
    else:
        path = recipe_file(recipe, fx, work) if recipe in ("text", "lm", "csv") else REPO / recipe
        config = src / "src" / "protege" / "data" / "config.py"  # DataConfig's file since the redesign
        declared = config.read_text() if config.is_file() else ""
        fill = [s.replace("{T}", str(teacher)) for s in sets] + [item for item, field in LATER_DEFAULTS.get(case, [])
                                                                 if f"    {field}" in declared]
        commands = [cli + ["distill", str(path), "--out", str(run), "--overwrite"] + [a for s in fill for a in ("--set", s)]]
    commands += [cli + [a.replace("{RUN}", str(run)) for a in c] for c in after]
    start = time.perf_counter()
    for c in commands:
        p = subprocess.run(c, env=env, cwd=src, capture_output=True, text=True)
        if p.returncode != 0:
            return {"error": f"{' '.join(c[3:])}: exit {p.returncode}: {(p.stderr or p.stdout).strip().splitlines()[-1:]}"}
    tensors, aliases = tensor_digests(run)
    return {"seconds": round(time.perf_counter() - start, 1), "report": report_numbers(run), "tensors": tensors,
            "aliases": aliases, "inputs": onnx_inputs(run)}


def tied_names(aliases: dict[str, str]) -> Callable[[str], str]:
    """A key's name for comparing: the least of the keys declared one tensor with it (itself if none)."""
    groups: dict[str, set[str]] = {}
    for alias, kept in aliases.items():
        members = groups.get(alias, {alias}) | groups.get(kept, {kept})
        groups.update(dict.fromkeys(members, members))
    return lambda k: min(groups.get(k, {k}))


def by_tied_name(tensors: dict[str, str], name: Callable[[str], str]) -> dict[str, str]:
    """The digests under each key's comparing name (the distinct digests joined, should a file hold two keys of one
    tied tensor that differ)."""
    out: dict[str, set[str]] = {}
    for k, digest in tensors.items():
        out.setdefault(name(k), set()).add(digest)
    return {k: " | ".join(sorted(v)) for k, v in out.items()}


def differences(a: dict, b: dict) -> list[str]:
    if "error" in a or "error" in b:
        return [f"reference: {a.get('error', 'ok')}; this tree: {b.get('error', 'ok')}"]
    out = []
    name = tied_names({**a.get("aliases", {}), **b.get("aliases", {})})
    for part in ("report", "tensors", "inputs"):
        x, y = a.get(part, {}), b.get(part, {})
        if part == "tensors":
            x, y = by_tied_name(x, name), by_tied_name(y, name)
        for k in sorted(set(x) | set(y)):
            same = holds(x.get(k), y.get(k)) if part == "inputs" and k in x else x.get(k) == y.get(k)
            if not same:
                out.append(f"{part} {k}: {str(x.get(k))[:200]!r} -> {str(y.get(k))[:200]!r}")
    return out


def tree_label() -> str:
    """This tree's commit (and whether src/ has uncommitted changes), or its path where it is no git checkout."""
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return f"{REPO} (not a git checkout)"
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"], capture_output=True,
                                text=True).stdout.strip())
    return head.stdout.strip() + (" (uncommitted changes in src/)" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", default=REFERENCE, help="the commit to compare with (default: %(default)s)")
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--quick", action="store_true", help="leave out the demo (70 epochs)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "identity.json")
    ap.add_argument("--repo", type=Path, default=REPO,
                    help="the git repository the reference commit is checked out from (default: this tree)")
    args = ap.parse_args()
    cases = [c for c in args.cases if not (args.quick and c == "demo")]
    if any("{T}" in s for c in cases for s in CASES[c][1]) and "teacher_kd" not in cases:
        cases.insert(0, "teacher_kd")
    with tempfile.TemporaryDirectory(prefix="protege-identity-") as tmp:
        tmp = Path(tmp)
        ref = tmp / "reference"
        subprocess.run(["git", "-C", str(args.repo), "worktree", "add", "--detach", "-q", str(ref), args.reference], check=True)
        try:
            fx = fixtures(tmp / "fixtures")
            results, verdicts = {}, {}
            for case in cases:
                got = {}
                for label, src in (("reference", ref), ("this_tree", REPO)):
                    t = tmp / label / "teacher_kd" / "teacher" / "model.safetensors"
                    got[label] = run_version(src, case, tmp / label, fx, t)
                diff = differences(got["reference"], got["this_tree"])
                known = bool(diff) and case in KNOWN_CHANGES and not any(d.startswith("reference:") for d in diff)
                verdicts[case] = "identical" if not diff else f"changed on purpose: {KNOWN_CHANGES[case]}" if known else diff
                results[case] = got
                shown = "identical" if not diff else "changed on purpose" if known else "DIFFERS"
                print(f"{case:22s} {shown}  "
                      f"({got['reference'].get('seconds', '-')} s / {got['this_tree'].get('seconds', '-')} s; "
                      f"{len(got['this_tree'].get('tensors', {}))} tensors, {len(got['this_tree'].get('report', {}))} figures)",
                      flush=True)
                for line in diff[:8]:
                    print(f"    {line}")
        finally:
            subprocess.run(["git", "-C", str(args.repo), "worktree", "remove", "--force", str(ref)], check=False)
    summary = {"command": "python benchmarks/identity.py" + (" --quick" if args.quick else ""), "reference": args.reference,
               "this_tree": tree_label(),
               "environment": environment(2), "verdicts": verdicts,
               "identical": sum(v == "identical" for v in verdicts.values()), "cases": len(verdicts),
               "changed_on_purpose": sorted(c for c, v in verdicts.items() if str(v).startswith("changed on purpose")),
               "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    known = summary["changed_on_purpose"]
    print(f"{summary['identical']}/{summary['cases']} cases identical" + (f", {len(known)} changed on purpose ({', '.join(known)})"
                                                                       if known else "") + f"; {args.out}")
    sys.exit(0 if summary["identical"] + len(known) == summary["cases"] else 1)


if __name__ == "__main__":
    main()
