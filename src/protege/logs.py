"""Messages and progress. Every module logs through ``logging.getLogger(__name__)`` (under the ``protege`` logger);
the library never configures logging itself: the CLI calls ``setup`` (a rich handler), and a script that wants
protege's messages calls it too, or configures ``logging`` its own way.

Long work is never silent: ``progress`` draws a bar in a terminal and, when output goes to a file or a pipe,
logs a line every ``every`` seconds instead (what it is doing, how far it got, the time left).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
import warnings
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")
ROOT = "protege"
# other libraries' loggers that chatter while protege uses them: transformers (weights not initialised, ...), the
# torchao it imports ("Failed to load ..._C_mxfp8.so", CUDA-only kernels) and torch's pytree deprecation notes it
# triggers, and the ONNX exporter's optimizer notes
CHATTY = ("transformers", "torchao", "torch", "torch.onnx", "onnxscript", "onnx_ir", "optuna")


def setup(level: int = logging.INFO) -> None:
    """Show protege's messages on stdout (stderr is left to errors: one line each): with rich in a terminal (time,
    level), as plain timestamped lines when output goes to a file or a pipe."""
    logger = logging.getLogger(ROOT)
    for h in [h for h in logger.handlers if getattr(h, "_protege", False)]:
        logger.removeHandler(h)
    if sys.stdout.isatty():
        from rich.console import (
            Console,  # (rich: a dependency, imported only where a terminal is drawn on)
        )
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=Console(), show_path=False, markup=False, log_time_format="[%X]")
    else:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    handler._protege = True  # type: ignore[attr-defined]  (ours to replace on a second setup)
    logger.addHandler(handler)
    # the other processes of a multi-process run (Accelerate sets RANK) say only what goes wrong
    logger.setLevel(level if os.environ.get("RANK", "0") == "0" else max(level, logging.WARNING))
    logger.propagate = False


def interactive() -> bool:
    """Whether a progress bar can be drawn (tqdm draws on stderr: it must be a terminal)."""
    return sys.stderr.isatty()


def progress(items: Iterable[T], desc: str, total: Optional[int] = None, *, logger: Optional[logging.Logger] = None,
             every: float = 30.0, enabled: bool = True, postfix: Optional[dict] = None) -> Iterator[T]:
    """Iterate ``items`` showing progress: a tqdm bar in a terminal, else a log line every ``every`` seconds
    (``desc: i/total (pct), elapsed, about N s left``). ``enabled=False`` (other processes of a multi-process run):
    silent. ``postfix``: a dict the caller updates (shown on the bar and in the lines, e.g. the running loss)."""
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)  # type: ignore[arg-type]
    if not enabled:
        yield from items
        return
    if interactive():
        from tqdm.auto import tqdm

        bar = tqdm(items, desc=desc, total=total, leave=False)
        for item in bar:
            yield item
            if postfix:
                bar.set_postfix(postfix, refresh=False)
        return
    log = logger or logging.getLogger(ROOT)
    start = last = time.monotonic()
    for i, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= every:
            last = now
            done = f"{i}/{total} ({i / total:.0%})" if total else f"{i}"
            left = f", about {(now - start) / i * (total - i):.0f} s left" if total else ""
            extra = "".join(f", {k} {v}" for k, v in (postfix or {}).items())
            log.info(f"{desc}: {done}, {now - start:.0f} s{left}{extra}")


@contextlib.contextmanager
def quiet(stdout: bool = False, stderr: bool = False, root: bool = False) -> Iterator[None]:
    """Silence other libraries while protege calls them: their warnings and their loggers below ERROR (``root``: every
    logger), and optionally what they print. Everything is put back on the way out, so protege never changes logging
    for whoever uses it. Usable as a decorator (``@quiet()``)."""
    names = [*CHATTY, ""] if root else list(CHATTY)
    saved = {name: logging.getLogger(name).level for name in names}
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        if stdout:
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        if stderr:
            stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
        for name in names:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for name, level in saved.items():
                logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """``quiet()`` for Hugging Face transformers, whose own logging setup (made when it is first imported) and load
    reports and progress bars ignore the standard logger levels: its verbosity and bars are set for the call and
    put back afterwards. Usable as a decorator."""
    with quiet():
        from transformers.utils import (
            logging as hf_logging,  # heavy: imported only where transformers is used anyway
        )

        level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)
            if bars:
                hf_logging.enable_progress_bar()
