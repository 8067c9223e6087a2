"""Who may write to a run folder, and what protege wrote there: an advisory lock (``flock`` on ``.protege.lock``)
that a second writer is refused by, naming the holder, and ``manifest.json``, the files protege wrote (what
``--overwrite`` removes)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path
from typing import Iterator, Optional

from ..errors import FolderInUse, RunError, StorageError
from ..files import write_atomic
from .layout import ARTIFACTS, CHECKPOINT_FILES, JOIN, LOCK, MANIFEST


def own_files(path: Path) -> list[str]:
    """Files in a run folder at the names protege writes (relative paths): its artifacts, the teacher caches'
    files named in their meta.json, top-k caches, and born-again generations."""
    found = [rel for rel in ARTIFACTS if (path / rel).is_file()]
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
    """Hold the run folder's advisory lock while ``command`` writes to it; a second writer (another process, or a
    second hold in this one) is refused, naming the holder. The kernel releases the lock when the process ends in
    any way (SIGKILL too). On the way out, the run's manifest records what this command wrote. ``create``: make
    the folder (a new run); otherwise a missing folder is left for the command itself to report."""
    path = Path(path)
    if not enabled or not (create or path.is_dir()):
        yield
        return
    if path.exists() and not path.is_dir():
        raise RunError(f"output path '{path}' is a file; choose a folder for --out")
    made = [p for p in [path, *path.parents] if not p.exists()]  # folders this command creates
    fresh = not (path / LOCK).exists()
    handle, killed = _acquire(path, command)
    try:
        if killed and (path / "recipe.yaml").is_file():  # what the killed command wrote goes into the manifest now
            _write_manifest(path, {})
        before = _stats(path)
    except (OSError, StorageError):
        before = {}
    try:
        yield
    finally:
        _release(path, handle, before, fresh, made)


def wait_until_free(path: str | Path) -> None:
    """Block while another process (or another hold in this one) holds the run folder's lock; return at once when it
    has no lock file or nobody holds it. The lock file is only read: its holder's line stays."""
    import fcntl  # POSIX only: imported where it is used

    try:
        handle = open(Path(path) / LOCK)
    except OSError:
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_SH)  # granted once no writer holds it
        fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def joined(path: str | Path, alone: bool = False) -> Iterator[None]:
    """A folder that several processes may work in together (a --seeds run: each run folder in it has its own lock):
    each holds ``path/.protege.join`` shared while it works; ``alone`` (--overwrite, which replaces what the others
    would read) holds it exclusively. Refused at once (FolderInUse) when that is not possible."""
    import fcntl  # POSIX only: imported where it is used

    path = Path(path)
    made = not path.exists()
    for _ in range(100):  # (again only when a process whose start failed removed the file, or its folder, in between)
        try:
            path.mkdir(parents=True, exist_ok=True)
            handle = open(path / JOIN, "a")
        except FileNotFoundError:
            continue
        except OSError as e:
            raise RunError(f"cannot write to the folder '{path}': {e.strerror}; choose a writable folder for --out") from None
        try:
            fcntl.flock(handle, (fcntl.LOCK_EX if alone else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise FolderInUse(f"'{path}' is in use by another protege process" + (
                " (other processes are working in it); wait for them to finish, or use another folder" if alone else
                " that is overwriting it; wait for it to finish, then run again with --resume")) from None
        if _same_file(handle, path / JOIN):
            break
        handle.close()  # a lock on a removed file would keep nobody out: lock the one there now
    else:
        raise RunError(f"cannot lock the folder '{path}': its {JOIN} keeps being removed; choose another folder for --out")
    with handle:
        try:
            yield
        finally:  # nothing else was written (a start that failed) and nobody else is here: leave no trace
            try:
                if [p.name for p in path.iterdir()] == [JOIN]:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    (path / JOIN).unlink()
                    if made:
                        path.rmdir()
            except OSError:
                pass


def _same_file(handle, path: Path) -> bool:
    """Whether the open ``handle`` is still the file at ``path`` (not one removed after it was opened)."""
    try:
        mine, there = os.fstat(handle.fileno()), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def _acquire(path: Path, command: str) -> tuple:
    """Open and lock ``path/.protege.lock``, write the holder into it; (the file, whether the last holder was killed)."""
    import fcntl  # POSIX only: imported where it is used

    for _ in range(100):  # (again only when the last holder removed the file, or its folder, in between)
        try:
            path.mkdir(parents=True, exist_ok=True)
            handle = open(path / LOCK, "a+")
        except FileNotFoundError:  # its last holder removed the folder between the two calls
            continue
        except OSError as e:
            raise RunError(f"cannot write to the run folder '{path}': {e.strerror}; choose a writable folder for --out") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise FolderInUse(f"'{path}' is in use by another protege process ({holder}); wait for it to finish, or use "
                              f"another folder") from None
        if _same_file(handle, path / LOCK):
            break
        handle.close()  # its last holder wrote nothing and removed it after this process opened it: lock the new one
    else:
        raise RunError(f"cannot lock the run folder '{path}': its lock file or the folder keeps being removed; choose another "
                       f"folder for --out")
    handle.seek(0)
    killed = bool(handle.read().strip())  # the last holder never emptied the file: it was killed (SIGKILL, power)
    handle.seek(0)
    handle.truncate()
    handle.write(f"PID {os.getpid()}: protege {command}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    handle.flush()
    return handle, killed


def _release(path: Path, handle, before: dict[str, tuple], fresh: bool, made: list[Path]) -> None:
    """Record what the command wrote, then empty and close the lock file (or remove it, with the folders this
    command made, if nothing else was written)."""
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


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:  # missing, or holds files protege did not write: left alone
        pass
