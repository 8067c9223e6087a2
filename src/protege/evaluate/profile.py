"""CPU latency: warm-up, fixed thread count, median (p50) and p95 in milliseconds."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

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


def example_batch(inputs: Union[Sequence[int], torch.Tensor], batch: int) -> torch.Tensor:
    """A batch to time: random normal values of shape ``inputs``, or the first example of a tensor repeated
    (token ids must be real ids, so text models are timed on a real example)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:1].expand(batch, *inputs.shape[1:]).contiguous()
    return torch.randn(batch, *inputs, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def torch_latency(model: nn.Module, inputs: Union[Sequence[int], torch.Tensor], batch: int, threads: int, warmup: int = 5,
                  repeats: int = 30) -> dict[str, float]:
    """p50 / p95 ms of ``model`` on a batch of ``batch`` (see example_batch for ``inputs``)."""
    model = model.eval()
    x = example_batch(inputs, batch)
    with torch_threads(threads):
        return _time(lambda: model(x), warmup, repeats)


def ort_latency(path: Path, inputs: Union[Sequence[int], torch.Tensor], batch: int, threads: int, warmup: int = 5,
                repeats: int = 30) -> dict[str, float]:
    from ..export.onnx import ort_session

    sess = ort_session(path, threads)
    name = sess.get_inputs()[0].name
    x = example_batch(inputs, batch).numpy()
    return _time(lambda: sess.run(None, {name: x}), warmup, repeats)
