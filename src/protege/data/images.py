"""Image files as a data source: a folder with one subfolder per class, or a manifest (.csv / .jsonl with the columns
`path` and `label`, paths relative to the manifest), decoded with Pillow to one channel count and one size."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError, StorageError
from ..files import exclusive, write_error, write_fix
from ..logs import progress
from .labels import check_labels, ordered_classes, require_two_classes
from .text import cache_root, read_rows

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def list_images(path: str, encoding: str = "utf-8") -> tuple[list[Path], list[str]]:
    """(files, label of each) from a class-folder tree or a manifest file."""
    root = Path(path)
    if root.is_dir():
        return _class_folders(root)
    if root.is_file() and root.suffix in (".csv", ".jsonl"):
        return _manifest(root, encoding)
    if root.is_file():
        raise DataError(f"data.path '{root}' is a {root.suffix or 'plain'} file; for images give a folder with one "
                        f"subfolder per class, or a manifest (.csv / .jsonl with columns path and label)")
    raise DataError(f"image folder or manifest '{root}' not found; set data.path to a folder with one subfolder per "
                    f"class, or to a .csv / .jsonl manifest")


def _class_folders(root: Path) -> tuple[list[Path], list[str]]:
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class subfolders; put each class's images in a subfolder named after the class "
                        f"({root}/cat/1.png, {root}/dog/2.png, ...)")
    files, labels = [], []
    for folder in classes:
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        if not found:
            raise DataError(f"class folder {folder} holds no images ({', '.join(sorted(SUFFIXES))}); add images or remove "
                            f"the folder")
        files += found
        labels += [folder.name] * len(found)
    return files, labels


def _manifest(path: Path, encoding: str) -> tuple[list[Path], list[str]]:
    rows = read_rows(path, encoding)
    if not rows:
        raise DataError(f"manifest {path} has no rows; list one image per row (columns path and label)")
    missing = [c for c in ("path", "label") if c not in rows[0]]
    if missing:
        raise DataError(f"manifest {path} has no column {' or '.join(missing)}; its columns: {', '.join(map(str, rows[0]))}")
    labels = [r.get("label") for r in rows]
    first = 2 if path.suffix == ".csv" else 1  # a CSV's header is row 1
    check_labels(labels, str(path), "label", first_row=first)
    files = []
    for n, r in enumerate(rows, first):
        f = path.parent / str(r.get("path") or "")
        if not f.is_file():
            raise DataError(f"manifest {path}: row {n} names '{r.get('path')}', which is not a file (paths are relative "
                            f"to the manifest's folder); fix the path or remove the row")
        files.append(f)
    return files, [str(v).strip() for v in labels]


def decode_images(items: list[tuple[str, Callable[[], Image.Image]]], channels: Optional[int], size: Optional[list[int]],
                  skip_bad: bool) -> tuple[np.ndarray, list[int], list[str]]:
    """uint8 (N, C, H, W) of the images that decode, their indices, and the names of those skipped (see ``each_image``)."""
    skipped: list[str] = []
    kept, out = [], []
    for i, a in each_image(items, channels, size, skip_bad, skipped):
        kept.append(i)
        out.append(a)
    return np.stack(out), kept, skipped


def each_image(items: list[tuple[str, Callable[[], Image.Image]]], channels: Optional[int], size: Optional[list[int]],
               skip_bad: bool, skipped: list[str]) -> Iterator[tuple[int, np.ndarray]]:
    """(index, uint8 (C, H, W)) of each image that decodes; the names of those skipped are appended to ``skipped``
    (``skip_bad``; otherwise an unreadable image is an error). ``items``: (name for messages, a call that opens the
    image). Every image is converted to ``channels`` (default: 1 if the first is grayscale, else 3) and resized to
    ``size`` [H, W] (default: all images must already share one size)."""
    mode, first, n = None, None, 0
    if channels is not None:
        mode = "L" if channels == 1 else "RGB"
    for i, (name, open_image) in enumerate(items):
        try:
            with open_image() as im:
                im.load()
                im = _eight_bit(im, name)
                if mode is None:
                    mode = "L" if im.mode in ("1", "L") else "RGB"
                im = im.convert(mode)
                if size is not None:
                    im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            if not skip_bad:
                raise DataError(f"{name} is not a readable image ({type(e).__name__}); fix or remove it, or set "
                                f"data.skip_bad_files: true to skip unreadable files (they are counted in the report)") from None
            skipped.append(name)
            continue
        if first is None:
            first = (name, a.shape[:2])
        elif a.shape[:2] != first[1]:
            raise DataError(f"images of different sizes: {first[0]} is {first[1][1]}x{first[1][0]} but {name} is "
                            f"{a.shape[1]}x{a.shape[0]} (width x height); set data.image_size: [height, width] to resize them all")
        n += 1
        yield i, (a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    if not n:
        raise DataError(f"none of the {len(items)} images could be read; check the files")
    if skipped:
        log.warning(f"data: skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]}")


def decoded_file(files: list[Path], channels: Optional[int], size: Optional[list[int]],
                 skip_bad: bool) -> tuple[np.memmap, list[int], list[str], str]:
    """The files decoded once into a uint8 file (N, C, H, W) under the cache folder, memory-mapped: (images, indices
    of the files that decoded, files skipped, sha256 of the images). The cache is keyed by each file's path, size
    and modification time and by the channels and size asked for; a second run (or a second process, which waits
    for the first) reads it instead of decoding again. Memory stays flat however many files there are."""
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, channels, size, skip_bad] + [
        [str(f.resolve()), *(lambda st: (st.st_size, st.st_mtime_ns))(f.stat())] for f in files]).encode()).hexdigest()[:24]
    folder = cache_root() / "images" / key
    with exclusive(folder.with_suffix(".lock")):  # one process decodes; the others wait, then read what it wrote
        if not (folder / "meta.json").is_file():
            _decode_into(folder, files, channels, size, skip_bad)
    meta = json.loads((folder / "meta.json").read_text())
    x = np.memmap(folder / "images.u8", dtype=np.uint8, mode="r", shape=tuple(meta["shape"]))
    return x, meta["kept"], meta["skipped"], meta["sha256"]


def _decode_into(folder: Path, files: list[Path], channels: Optional[int], size: Optional[list[int]], skip_bad: bool) -> None:
    """Decode ``files`` into ``folder`` (images.u8 and meta.json), written in a temporary folder, then renamed."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    h, kept, skipped, shape = hashlib.sha256(), [], [], None
    items = [(str(f), lambda f=f: Image.open(f)) for f in files]
    try:
        with open(tmp / "images.u8", "wb") as out:
            for i, a in progress(each_image(items, channels, size, skip_bad, skipped), "decoding images", total=len(items),
                                 logger=log):
                b = np.ascontiguousarray(a).tobytes()
                out.write(b)
                h.update(b)
                kept.append(i)
                shape = a.shape
        (tmp / "meta.json").write_text(json.dumps({"shape": [len(kept), *shape], "kept": kept, "skipped": skipped,
                                                   "sha256": h.hexdigest()}))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(f"cannot write the decoded images to {tmp} ({write_error(e)}); {write_fix(e, folder)}, or "
                           f"set PROTEGE_CACHE to a folder with room") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _eight_bit(im: Image.Image, name: str) -> Image.Image:
    """A 16-bit grayscale image as 8 bits (value / 257, so 65535 -> 255), where Pillow's convert would clip at 255;
    32-bit integer and floating-point images are refused (their range is not known)."""
    if im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8), "L")
    if im.mode in ("I", "F"):
        raise DataError(f"{name} is a {'32-bit integer' if im.mode == 'I' else 'floating-point'} image, whose value range "
                        f"protege cannot know; save it as an 8- or 16-bit PNG, or give the pixels as arrays (data.source: arrays)")
    return im


def read_images(path: str, channels: Optional[int], size: Optional[list[int]], skip_bad: bool, encoding: str = "utf-8",
                classes: Optional[list[str]] = None) -> tuple[np.memmap, np.ndarray, list[str], list[str], str]:
    """(uint8 images (N, C, H, W) memory-mapped, class index per image, class names, files skipped, sha256 of the
    images)."""
    files, labels = list_images(path, encoding)
    x, kept, skipped, digest = decoded_file(files, channels, size, skip_bad)
    labels = [labels[i] for i in kept]
    classes = ordered_classes(labels, classes, str(path), "the class folders (or the manifest's labels)")
    require_two_classes(classes, str(path), "label (class folders)")
    index = {c: i for i, c in enumerate(classes)}
    return x, np.array([index[v] for v in labels], dtype=np.int64), classes, skipped, digest
