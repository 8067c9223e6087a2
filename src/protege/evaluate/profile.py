"""CPU latency: warm-up, fixed thread count, median (p50) and p95 in milliseconds."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _time(fn: Callable[[], object], warmup: int, repeats: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"p50": float(np.percentile(times, 50)), "p95": float(np.percentile(times, 95))}


@torch.no_grad()
def torch_latency(model: nn.Module, input_shape: Sequence[int], batch: int, threads: int, warmup: int = 5, repeats: int = 30) -> dict[str, float]:
    model = model.eval()
    x = torch.randn(batch, *input_shape)
    with torch_threads(threads):
        return _time(lambda: model(x), warmup, repeats)


def ort_latency(path: Path, input_shape: Sequence[int], batch: int, threads: int, warmup: int = 5, repeats: int = 30) -> dict[str, float]:
    from ..export.onnx import ort_session

    sess = ort_session(path, threads)
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, *input_shape)).astype(np.float32)
    return _time(lambda: sess.run(None, {name: x}), warmup, repeats)
