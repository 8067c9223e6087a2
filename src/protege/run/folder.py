"""The run folder: where every stage writes, and how a later command finds what an earlier one made."""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from torch import nn

from ..errors import ModelError, RunError
from ..evaluate import report as reports
from ..evaluate.report import Report
from ..models import OnnxModule, build_model, load_weights
from ..models.loading import resize_to
from ..recipe import Recipe, dump_recipe, parse_recipe
from ..train.guard import require_finite
from .layout import COMPRESS_ARTIFACTS, LOCK, MANIFEST
from .lock import _rmdir_if_empty, own_files, read_manifest


@dataclass(frozen=True)
class ModelShapes:
    """The facts about the data that building a model needs (what DataSplits offers, without the examples)."""

    input_shape: tuple[int, ...]
    num_classes: int
    model_args: Optional[dict] = None


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
    report: Optional[Report] = field(default=None)
    shared_cache: Optional[Path] = None  # a folder of teacher caches shared with other runs (a tune's trials), else own

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
    def load(cls, path: str | Path, *, read_report: bool = True) -> "Run":
        """Open a run folder; a damaged recipe.yaml or report.json is a one-line error naming the file.
        (``read_report=False``: the report is not needed, as for the commands that rewrite it.)"""
        import yaml

        path = Path(path)
        rec = path / "recipe.yaml"
        if not rec.is_file():
            raise RunError(f"'{path}' is not a run folder (no recipe.yaml); run `protege distill RECIPE --out {path}` first")
        try:
            data = yaml.safe_load(rec.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as e:
            raise RunError(f"{rec} is damaged ({type(e).__name__}); it records the run's recipe: restore it, or rerun "
                           f"`protege distill RECIPE --out {path} --overwrite`") from None
        if not isinstance(data, dict):
            raise RunError(f"{rec} is damaged (not a mapping); it records the run's recipe: restore it, or rerun "
                           f"`protege distill RECIPE --out {path} --overwrite`")
        recipe = parse_recipe(data, str(rec))
        report = None
        if read_report and (path / "report.json").is_file():
            report = reports.read_report(path / "report.json", f"rewrite it with `protege evaluate {path}`")
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
        if path.is_dir() and any(p.name != LOCK for p in path.iterdir()) and not rec.is_file() and not overwrite:
            raise RunError(f"'{path}' is not empty and is not a run; choose an empty or new folder for --out (or --overwrite)")
        return cls(path, recipe)

    def clear_compressed(self, keep_pruned: bool = False) -> None:
        """A new compress pass: drop what an earlier one wrote, so no stale file is mistaken for this one's."""
        for rel in COMPRESS_ARTIFACTS:
            if not (keep_pruned and rel.startswith("pruned")):
                (self.path / rel).unlink(missing_ok=True)

    @contextlib.contextmanager
    def restored_on_failure(self) -> Iterator[None]:
        """Snapshot the compress outputs, recipe and reports; if the block fails, put them back exactly."""
        names = [*COMPRESS_ARTIFACTS, "recipe.yaml", "report.json", "report.html", "student.onnx", "metrics.jsonl", MANIFEST]
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
        """--overwrite: remove what an earlier run of protege wrote here, so nothing of it can be mistaken for this
        run's work. The files go by the run's manifest (what protege recorded writing); a run without one (killed
        before its first command ended) loses only files at protege's own names. Other files are left alone."""
        listed = read_manifest(self.path)
        removed = listed if listed is not None else own_files(self.path)
        for rel in removed:
            (self.path / rel).unlink(missing_ok=True)
        folders = {parent for rel in removed for parent in Path(rel).parents if parent != Path(".")}
        for rel in sorted(folders, key=lambda p: len(p.parts), reverse=True):  # folders the removal left empty
            _rmdir_if_empty(self.path / rel)
        (self.path / MANIFEST).unlink(missing_ok=True)

    def shapes(self) -> "ModelShapes":
        """What rebuilds the run's models without reading its data: student/config.json's input shape, classes and
        model arguments."""
        cfg_file = self.path / "student" / "config.json"
        if not cfg_file.is_file():
            raise ModelError(f"{cfg_file} is missing: the run is not finished; inspect a zoo name or file.py:factory instead")
        cfg = read_json(cfg_file, f"finish the run with `protege distill RECIPE --out {self.path} --resume`")
        if not isinstance(cfg, dict) or "in_shape" not in cfg or "num_classes" not in cfg:
            raise ModelError(f"{cfg_file} does not record the input shape (a causal-LM run); inspect the model folder instead")
        return ModelShapes(tuple(cfg["in_shape"]), cfg["num_classes"], cfg.get("model_args"))

    def load_models(self, data) -> tuple[list[nn.Module], nn.Module]:
        """The finished run's teachers (as trained or loaded; an ema teacher from its saved average) and its student,
        in eval mode; weights holding NaN or inf are refused. ``data``: the run's DataSplits (shapes, classes)."""
        self._require_student()  # before the teachers are built: they may take long
        r = self.recipe
        teachers = []
        for i, spec in enumerate(r.teachers):
            trained_here = i == 0 and (r.ema_teacher or spec.train is not None)
            if r.ema_teacher:
                spec = r.student.model_copy(update={"weights": None})
            t = build_model(spec, data.input_shape, data.num_classes, data.model_args)
            if trained_here and not isinstance(t, OnnxModule) and not spec.weights:
                load_weights(t, self.teacher_weights)
            require_finite(t, self.teacher_weights if trained_here else spec.weights or spec.model, "teacher")
            teachers.append(t.eval())
        return teachers, self.load_student(data)

    def load_student(self, data) -> nn.Module:
        """The finished student, in eval mode."""
        self._require_student()
        student = self._student_shell(data)
        load_weights(student, self.student_weights)
        require_finite(student, self.student_weights, "student")
        return student.eval()

    def load_pruned(self, data) -> Optional[nn.Module]:
        """The pruned student (channels removed, so rebuilt at its smaller shapes), or None if the run has none."""
        if not self.pruned_weights.is_file():
            return None
        model = resize_to(self._student_shell(data), self.pruned_weights, self.pruned_info().get("conv_groups")).eval()
        require_finite(model, self.pruned_weights, "pruned student")
        return model

    def _require_student(self) -> None:
        if not self.student_weights.is_file():
            raise RunError(f"{self.path} has no finished student ({self.student_weights} missing); finish it with "
                           f"`protege distill RECIPE --out {self.path} --resume`")

    def _student_shell(self, data) -> nn.Module:
        """The student's architecture, built for ``data``, before its weights are loaded."""
        return build_model(self.recipe.student.model_copy(update={"weights": None}), data.input_shape, data.num_classes,
                           data.model_args)

    def pruned_info(self) -> dict:
        """pruned/config.json: what the pruning did (steps, parameters, conv groups)."""
        path = self.path / "pruned" / "config.json"
        fix = f"redo the pruning with `protege compress {self.path} --prune RATIO`"
        info = read_json(path, fix)
        if not isinstance(info, dict):
            raise RunError(f"{path} is damaged (not a mapping); {fix}")
        return info

    def write_recipe(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "teacher").mkdir(exist_ok=True)
        (self.path / "student").mkdir(exist_ok=True)
        dump_recipe(self.recipe, self.path / "recipe.yaml")


def read_json(path: Path, fix: str) -> Any:
    """A JSON file protege wrote, read back; damaged or unreadable -> a one-line RunError naming it and ``fix``."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RunError(f"{path} is damaged or unreadable ({type(e).__name__}); {fix}") from None


def file_digest(path: Path) -> str:
    """A short hash of a file's bytes; for a sharded checkpoint's ``*.index.json``, of every shard it lists too."""
    h = hashlib.sha256()
    files = [Path(path)]
    if str(path).endswith(".index.json"):
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
        shards = set(json.loads(path.read_text()).get("weight_map", {}).values())
        return sum((path.parent / s).stat().st_size for s in shards)
    return path.stat().st_size
