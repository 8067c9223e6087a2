"""What a measurement records about the machine it ran on: CPU model and the flags int8 speed and exactness depend on."""
from __future__ import annotations

import os
import platform
from pathlib import Path

INT8_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16", "asimddp", "i8mm")


def cpu() -> tuple[str, list[str]]:
    """The CPU's model name and which of INT8_FLAGS it has (Linux /proc/cpuinfo; elsewhere the platform's name)."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip()
            if key in ("model name", "Model") and ":" in line:
                model = line.split(":", 1)[1].strip()
            if key in ("flags", "Features") and not flags:
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in INT8_FLAGS if f in have]
    except OSError:
        pass
    return model, flags


def int8_kernels(flags: list[str], machine: str | None = None) -> str:
    """How ONNX Runtime's uint8 x int8 kernels add products on this CPU (ORT's quantization docs, "reduce_range")."""
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64"):
        return "arm: exact int32 products"
    if "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags:
        return "x86 with VNNI: exact int32 products"
    return "x86 without VNNI: uint8 x int8 pairs saturate at int16 (weights above 7 bits can be wrong)"


def environment(threads: int) -> dict:
    """CPU model and flags, how its int8 kernels add, core and thread counts, library versions."""
    import onnxruntime
    import torch

    model, flags = cpu()
    return {"cpu": model, "cpu_flags": flags, "int8_kernels": int8_kernels(flags), "cores": os.cpu_count(),
            "threads": threads, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version()}
