"""The run folder: where every stage writes, and how a later command finds what an earlier one made."""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from .errors import RunError
from .recipe import Recipe, dump_recipe, parse_recipe


COMPRESS_ARTIFACTS = ("pruned/model.safetensors", "pruned/config.json", "pruned/checkpoints/last.safetensors",
                      "pruned/checkpoints/best.safetensors", "pruned.onnx", "pruned.rejected.onnx", "quantized/static.onnx",
                      "quantized/dynamic.onnx", "quantized/qat.onnx", "quantized/qat.rejected.onnx", "quantized/choice.json",
                      "student.int8.onnx")


@dataclass
class Run:
    """A run folder and its resolved recipe. Layout:

    recipe.yaml, metrics.jsonl, teacher/model.safetensors, teacher_cache/t0/{meta.json,*.npy},
    student/model.safetensors, student/checkpoints/{last,best}.safetensors, student.onnx,
    pruned/model.safetensors, pruned.onnx, quantized/{static,dynamic,qat}.onnx, quantized/choice.json,
    student.int8.onnx (the chosen int8 file), report.json, report.html
    """

    path: Path
    recipe: Recipe
    report: Optional[dict[str, Any]] = field(default=None)

    @property
    def teacher_weights(self) -> Path:
        return self.path / "teacher" / "model.safetensors"

    @property
    def student_weights(self) -> Path:
        return self.path / "student" / "model.safetensors"

    @property
    def onnx_path(self) -> Path:
        return self.path / "student.onnx"

    @property
    def pruned_weights(self) -> Path:
        return self.path / "pruned" / "model.safetensors"

    @property
    def pruned_onnx(self) -> Path:
        return self.path / "pruned.onnx"

    @property
    def int8_path(self) -> Path:
        return self.path / "student.int8.onnx"

    @property
    def quant_dir(self) -> Path:
        return self.path / "quantized"

    @property
    def report_path(self) -> Path:
        return self.path / "report.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @classmethod
    def load(cls, path: str | Path) -> "Run":
        import yaml

        path = Path(path)
        rec = path / "recipe.yaml"
        if not rec.is_file():
            raise RunError(f"'{path}' is not a run folder (no recipe.yaml); run `protege distill RECIPE --out {path}` first")
        recipe = parse_recipe(yaml.safe_load(rec.read_text()), str(rec))
        report = json.loads((path / "report.json").read_text()) if (path / "report.json").is_file() else None
        return cls(path, recipe, report)

    @classmethod
    def create(cls, path: str | Path, recipe: Recipe, *, overwrite: bool = False, resume: bool = False) -> "Run":
        """Open ``path`` for a new run (refusing to clobber a run) or for resuming one."""
        path = Path(path)
        rec = path / "recipe.yaml"
        if resume:
            if not rec.is_file():
                raise RunError(f"cannot resume: '{path}' holds no run (no recipe.yaml); drop --resume to start it")
            saved = cls.load(path).recipe
            if saved.model_dump() != recipe.model_dump():
                raise RunError(f"cannot resume: the recipe differs from {rec}; resume with the same recipe and --set values, or use a new --out")
            return cls(path, saved)
        if path.exists() and not path.is_dir():
            raise RunError(f"output path '{path}' is a file; choose a folder for --out")
        if rec.is_file() and not overwrite:
            raise RunError(f"'{path}' already holds a run; pass --resume to continue it, --overwrite to replace it, or choose another --out")
        if path.is_dir() and any(path.iterdir()) and not rec.is_file() and not overwrite:
            raise RunError(f"'{path}' is not empty and is not a run; choose an empty or new folder for --out (or --overwrite)")
        return cls(path, recipe)

    ARTIFACTS = ("teacher/model.safetensors", "teacher/config.json", "teacher/checkpoints/last.safetensors",
                 "teacher/checkpoints/best.safetensors", "student/model.safetensors", "student/config.json",
                 "student/checkpoints/last.safetensors", "student/checkpoints/best.safetensors",
                 "student.onnx", "student.rejected.onnx", "report.json", "metrics.jsonl", "report.html",
                 *COMPRESS_ARTIFACTS)


    def clear_compressed(self, keep_pruned: bool = False) -> None:
        """A new compress pass: drop what an earlier one wrote, so no stale file is mistaken for this one's."""
        for rel in COMPRESS_ARTIFACTS:
            if not (keep_pruned and rel.startswith("pruned")):
                (self.path / rel).unlink(missing_ok=True)

    @contextlib.contextmanager
    def restored_on_failure(self) -> Iterator[None]:
        """Snapshot the compress outputs, recipe and reports; if the block fails, put them back exactly."""
        names = [*COMPRESS_ARTIFACTS, "recipe.yaml", "report.json", "report.html", "student.onnx"]
        with tempfile.TemporaryDirectory() as td:
            saved = {}
            for rel in names:
                src = self.path / rel
                if src.is_file():
                    saved[rel] = Path(td) / rel.replace("/", "__")
                    shutil.copy2(src, saved[rel])
            try:
                yield
            except BaseException:
                for rel in names:
                    (self.path / rel).unlink(missing_ok=True)
                for rel, copy in saved.items():
                    (self.path / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(copy, self.path / rel)
                raise

    def clear_artifacts(self) -> None:
        """--overwrite: remove what an earlier run of protege wrote here (only those known files), so
        nothing of it can be mistaken for this run's work; other files in the folder are left alone."""
        for rel in self.ARTIFACTS:
            (self.path / rel).unlink(missing_ok=True)
        cache = self.path / "teacher_cache"
        for sub in sorted(cache.iterdir()) if cache.is_dir() else []:  # only cache folders protege wrote, file by file
            if sub.is_dir() and (sub / "meta.json").is_file():
                try:
                    files = [e["file"] for e in json.loads((sub / "meta.json").read_text())["entries"].values()]
                except (ValueError, KeyError, TypeError, AttributeError):
                    files = []
                for name in [*files, "meta.json"]:
                    if re.fullmatch(r"\d+\.npy|meta\.json", str(name)):
                        (sub / name).unlink(missing_ok=True)
                _rmdir_if_empty(sub)
        _rmdir_if_empty(cache)
        for old in (self.path / "student").glob("gen*"):  # born-again generations: gen{k}.safetensors, gen{k}_checkpoints/
            if old.is_file() and re.fullmatch(r"gen\d+\.safetensors", old.name):
                old.unlink()
            elif old.is_dir() and re.fullmatch(r"gen\d+_checkpoints", old.name):
                for name in ("last.safetensors", "best.safetensors"):
                    (old / name).unlink(missing_ok=True)
                _rmdir_if_empty(old)

    def write_recipe(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "teacher").mkdir(exist_ok=True)
        (self.path / "student").mkdir(exist_ok=True)
        dump_recipe(self.recipe, self.path / "recipe.yaml")


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:  # missing, or holds files protege did not write: left alone
        pass


def file_digest(path: Path) -> str:
    """A short hash of a file's bytes; for a sharded checkpoint's ``*.index.json``, of every shard it lists too."""
    h = hashlib.sha256()
    files = [Path(path)]
    if str(path).endswith(".index.json"):
        import json

        shards = sorted(set(json.loads(Path(path).read_text()).get("weight_map", {}).values()))
        files += [Path(path).parent / s for s in shards]
    for file in files:
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def weights_bytes(path: Path) -> int:
    """Bytes of a weights file; for a sharded checkpoint's ``*.index.json``, of all its shards."""
    path = Path(path)
    if str(path).endswith(".index.json"):
        import json

        shards = set(json.loads(path.read_text()).get("weight_map", {}).values())
        return sum((path.parent / s).stat().st_size for s in shards)
    return path.stat().st_size
