"""Run ONNX files on an emulated CPU: how an int8 file behaves on a CPU you do not have.

QEMU's user mode runs this machine's Python under a chosen CPU model, and ONNX Runtime picks its kernels from
what that CPU reports: "avx2" is QEMU's EPYC-Milan model (AMD EPYC with AVX2, no AVX-512, no VNNI), where
ONNX Runtime's uint8 x int8 kernels add pairs of products into saturating 16-bit integers. Slow (instructions are
translated), so for checks on a few hundred examples, not for timing. Needs `qemu-x86_64` (Debian: qemu-user) on
an x86-64 host. Run as a script (``python emulate.py WORKDIR``) it needs only numpy and onnxruntime, so the
emulated process does not import torch.
"""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CPUS = {"avx2": "EPYC-Milan"}


def available() -> str | None:
    """Why emulation cannot run here, or None when it can."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"QEMU user mode runs this machine's x86-64 Python; this host is {platform.machine()}"
    if shutil.which("qemu-x86_64") is None:
        return "qemu-x86_64 is not installed (Debian: apt-get install qemu-user)"
    return None


def run_emulated(files: dict[str, str | Path], x: np.ndarray, cpu: str = "avx2", timeout: float = 600) -> dict[str, np.ndarray]:
    """The first output of each ONNX file on ``x``, computed by ONNX Runtime (all optimisations on, one thread) on the
    emulated ``cpu``. Raises RuntimeError when emulation is unavailable or the emulated run fails."""
    why = available()
    if why:
        raise RuntimeError(why)
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        np.save(work / "x.npy", np.ascontiguousarray(x))
        (work / "files.json").write_text(json.dumps({k: str(Path(v).resolve()) for k, v in files.items()}))
        cmd = ["qemu-x86_64", "-cpu", CPUS[cpu], sys.executable, str(Path(__file__).resolve()), str(work)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"emulated run took longer than {timeout:g} s; give it fewer examples") from None
        if proc.returncode != 0:
            err = [ln for ln in proc.stderr.splitlines() if "TCG doesn't support" not in ln]
            raise RuntimeError(f"emulated run failed ({proc.returncode}): {' | '.join(err[-3:])}")
        return {k: np.load(work / f"{i}.npy") for i, k in enumerate(files)}


def _saturates(ort, opts) -> bool:
    """Whether this CPU's uint8 x int8 kernel saturates: 255 x 127 twice is 64,770, above int16's 32,767."""
    from onnx import TensorProto, helper, numpy_helper

    b = numpy_helper.from_array(np.full((2, 1), 127, np.int8), "B")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "probe",
                              [helper.make_tensor_value_info("A", TensorProto.UINT8, [1, 2])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [1, 1])], [b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return int(sess.run(None, {"A": np.full((1, 2), 255, np.uint8)})[0][0, 0]) != 2 * 255 * 127


def _main(work: Path) -> None:
    import onnxruntime as ort

    x = np.load(work / "x.npy")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    if not _saturates(ort, opts):  # the emulated CPU must be one whose kernels saturate, or the check means nothing
        sys.exit("the emulated CPU's int8 kernels do not saturate: QEMU did not provide an AVX2 CPU without VNNI")
    for i, path in enumerate(json.loads((work / "files.json").read_text()).values()):
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        outs = [sess.run(None, {name: x[j:j + 256]})[0] for j in range(0, len(x), 256)]
        np.save(work / f"{i}.npy", np.concatenate(outs))


if __name__ == "__main__":
    _main(Path(sys.argv[1]))
