"""What every benchmark result records about the machine it ran on."""
from __future__ import annotations

import platform
from pathlib import Path


def environment(threads: int) -> dict:
    import onnxruntime
    import torch

    cpu, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = sorted(f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16") if f in have)
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_flags": flags, "cores": __import__("os").cpu_count(), "threads": threads,
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}
