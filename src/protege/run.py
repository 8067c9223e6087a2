"""The run folder: where every stage writes, and how a later command finds what an earlier one made."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from .errors import RunError, StorageError
from .files import write_atomic
from .recipe import Recipe, dump_recipe, parse_recipe


CHECKPOINT_FILES = ("last.safetensors", "last.prev.safetensors", "best.safetensors")
COMPRESS_ARTIFACTS = ("pruned/model.safetensors", "pruned/config.json", "pruned/checkpoints/last.safetensors",
                      "pruned/checkpoints/last.prev.safetensors",
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
            report = read_json(path / "report.json", f"rewrite it with `protege evaluate {path}`")
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

    ARTIFACTS = ("teacher/model.safetensors", "teacher/config.json", "teacher/checkpoints/last.safetensors",
                 "teacher/checkpoints/last.prev.safetensors", "teacher/checkpoints/best.safetensors",
                 "student/model.safetensors", "student/config.json", "student/checkpoints/last.safetensors",
                 "student/checkpoints/last.prev.safetensors", "student/checkpoints/best.safetensors",
                 "student.onnx", "student.rejected.onnx", "report.json", "metrics.jsonl", "report.html", "recipe.yaml",
                 *COMPRESS_ARTIFACTS)


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

    def write_recipe(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "teacher").mkdir(exist_ok=True)
        (self.path / "student").mkdir(exist_ok=True)
        dump_recipe(self.recipe, self.path / "recipe.yaml")


MANIFEST = "manifest.json"
LOCK = ".protege.lock"
_HELD: dict[str, list] = {}  # run folders this process holds locked: resolved path -> [file, depth]


def own_files(path: Path) -> list[str]:
    """Files in a run folder at the names protege writes (relative paths): its artifacts, the teacher caches'
    files named in their meta.json, top-k caches, and born-again generations."""
    found = [rel for rel in Run.ARTIFACTS if (path / rel).is_file()]
    cache = path / "teacher_cache"
    for sub in sorted(cache.iterdir()) if cache.is_dir() else []:
        if not (sub.is_dir() and (sub / "meta.json").is_file()):
            continue
        try:
            entries = json.loads((sub / "meta.json").read_text()).get("entries", {})
            files = [e["file"] for e in entries.values()]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            files = []
        for name in [*files, "ids.npy", "logp.npy", "tail.npy", "meta.json"]:
            if re.fullmatch(r"\d+\.npy|ids\.npy|logp\.npy|tail\.npy|meta\.json", str(name)) and (sub / name).is_file():
                found.append(f"teacher_cache/{sub.name}/{name}")
    for old in sorted((path / "student").glob("gen*")):  # born-again generations: gen{k}.safetensors, gen{k}_checkpoints/
        if old.is_file() and re.fullmatch(r"gen\d+\.safetensors", old.name):
            found.append(f"student/{old.name}")
        elif old.is_dir() and re.fullmatch(r"gen\d+_checkpoints", old.name):
            found += [f"student/{old.name}/{n}" for n in CHECKPOINT_FILES if (old / n).is_file()]
    return sorted(set(found))


def read_manifest(path: Path) -> Optional[list[str]]:
    """The files the run's manifest lists (relative, inside the folder), or None if it has none or it is unreadable."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    safe = [f for f in files if isinstance(f, str) and not Path(f).is_absolute() and ".." not in Path(f).parts]
    return safe if len(safe) == len(files) else None


def _stats(path: Path) -> dict[str, tuple]:
    """Identity of each file at protege's names: (inode, size, mtime in ns)."""
    out = {}
    for rel in own_files(path):
        st = (path / rel).stat()
        out[rel] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def _write_manifest(path: Path, before: dict[str, tuple]) -> None:
    """Record the files protege wrote here: those the manifest listed that still exist, and files at protege's
    own names that this command created or changed (``before``: their identities when it started)."""
    listed = [f for f in read_manifest(path) or [] if (path / f).is_file()]
    written = [rel for rel, st in _stats(path).items() if before.get(rel) != st]
    write_atomic(path / MANIFEST, json.dumps({"files": sorted(set(listed + written))}, indent=1))


@contextlib.contextmanager
def locked(path: str | Path, command: str, enabled: bool = True, create: bool = False) -> Iterator[None]:
    """Hold the run folder's advisory lock while ``command`` writes to it; a second writer is refused, naming the
    holder. The kernel releases the lock when the process ends in any way (SIGKILL too). Re-entrant within a
    process. On the way out, the run's manifest records what this command wrote. ``create``: make the folder
    (a new run); otherwise a missing folder is left for the command itself to report."""
    import fcntl

    path = Path(path)
    if not enabled or not (create or path.is_dir()):
        yield
        return
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    if path.exists() and not path.is_dir():
        raise RunError(f"output path '{path}' is a file; choose a folder for --out")
    made = [p for p in [path, *path.parents] if not p.exists()]  # folders this command creates
    fresh = not (path / LOCK).exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle = open(path / LOCK, "a+")
    except OSError as e:
        raise RunError(f"cannot write to the run folder '{path}': {e.strerror}; choose a writable folder for --out") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunError(f"'{path}' is in use by another protege process ({holder}); wait for it to finish, or use another "
                       f"folder") from None
    handle.seek(0)
    killed = bool(handle.read().strip())  # the last holder never emptied the file: it was killed (SIGKILL, power)
    handle.seek(0)
    handle.truncate()
    handle.write(f"PID {os.getpid()}: protege {command}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    handle.flush()
    _HELD[key] = [handle, 1]
    try:
        if killed and (path / "recipe.yaml").is_file():  # what the killed command wrote goes into the manifest now
            _write_manifest(path, {})
        before = _stats(path)
    except (OSError, StorageError):
        before = {}
    try:
        yield
    finally:
        del _HELD[key]
        try:
            if (path / "recipe.yaml").is_file():
                _write_manifest(path, before)
        except (OSError, StorageError):
            pass  # a full disk: the manifest keeps its last state
        if fresh and [p.name for p in path.iterdir()] == [LOCK]:  # nothing else was written: leave no trace
            (path / LOCK).unlink(missing_ok=True)
            for folder in made:
                _rmdir_if_empty(folder)
        else:
            try:
                handle.truncate(0)  # empty at rest: only a held lock names its holder
            except OSError:
                pass
        handle.close()


def read_json(path: Path, fix: str) -> Any:
    """A JSON file protege wrote, read back; damaged or unreadable -> a one-line RunError naming it and ``fix``."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RunError(f"{path} is damaged or unreadable ({type(e).__name__}); {fix}") from None


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
