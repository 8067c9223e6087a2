"""Language-model metrics: perplexity on held-out blocks, and generation speed in tokens per second."""
from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from .profile import torch_threads


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, device: torch.device | str = "cpu") -> dict:
    """exp(mean next-token cross-entropy) over every position of ``blocks`` (N, L) but the last of each block."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        x = blocks[i:i + batch_size].to(device)
        logits = model(x)[:, :-1].float()
        total += float(F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
        count += x[:, 1:].numel()
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


@torch.no_grad()
def generation_speed(model: nn.Module, prompt: torch.Tensor, new_tokens: int, threads: int, repeats: int = 3) -> dict:
    """Greedy decoding of ``new_tokens`` after ``prompt`` (1, P) at batch 1 with the KV cache: median tokens / s."""
    model.eval()
    with torch_threads(threads):
        model.generate(prompt, 4, sample=False)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.generate(prompt, new_tokens, sample=False)
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"tokens_per_s": new_tokens / med, "ms_per_token": 1e3 * med / new_tokens, "new_tokens": new_tokens,
            "prompt_tokens": int(prompt.shape[1])}
