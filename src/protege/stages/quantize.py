"""The int8 stage of a run: make the candidates the recipe asks for (static, dynamic, QAT), check each against its
exact arithmetic, measure them on the validation split side by side, and deploy one."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from ..compress.qat import qat_to_onnx
from ..compress.quantize import (
    check_calibration,
    choose,
    load_calibration,
    quantize_dynamic,
    quantize_static,
)
from ..compress.verify import scheme, verify
from ..data import DataSplits
from ..errors import CompressError
from ..evaluate.profile import measure as measure_interleaved
from ..evaluate.profile import ort_timer, timing_inputs
from ..export.metadata import describe, stamp
from ..export.onnx import ort_logits, ort_session
from ..files import write_atomic
from ..run import Run
from .teacher import student_loss

log = logging.getLogger(__name__)


def _calibration(run: Run, data: DataSplits, src) -> np.ndarray:
    cfg = run.recipe.quantize
    if cfg.calibration_data:
        return check_calibration(load_calibration(cfg.calibration_data), src, f"'{cfg.calibration_data}'")
    g = torch.Generator().manual_seed(run.recipe.seed)
    idx = torch.randperm(len(data.train), generator=g)[: cfg.calibration_size]
    return check_calibration(data.train.x[idx].numpy(), src, f"(training split, {len(idx)} examples)")


def val_metrics(path, data: DataSplits, threads: int, reference: Optional[torch.Tensor] = None) -> dict:
    """Validation accuracy, agreement with the fp32 file's predictions (``reference``) and size of one ONNX file."""
    pred = ort_logits(ort_session(path, threads), data.val.x).argmax(-1)
    out = {"file": path.name, "bytes": path.stat().st_size, "val_accuracy": float((pred == data.val.y).float().mean())}
    if reference is not None:
        out["val_agreement_fp32"] = float((pred == reference).float().mean())
    return out


def latencies(files: dict, data: DataSplits, threads: int, warmup: int, repeats: tuple[int, int], rounds: int = 5) -> dict:
    """Batch-1 and batch-32 latency of several ONNX files, measured side by side in interleaved rounds: name -> the
    median (latency_ms_b1 / _b32) and whether the measurement stands (latency_b1_reliable / _b32_reliable)."""
    inputs = timing_inputs(data)
    out: dict = {name: {} for name in files}
    for b, n in zip((1, 32), repeats):
        m = measure_interleaved({k: ort_timer(ort_session(p, threads), inputs)(b) for k, p in files.items()},
                                rounds=min(rounds, n), total_calls=n, warmup=warmup, threads=threads)
        for name in files:
            st = m.stats(name)
            out[name].update({f"latency_ms_b{b}": st["median"], f"latency_ms_b{b}_p95": st["p95"],
                              f"latency_ms_b{b}_iqr": st["iqr"], f"latency_b{b}_reliable": st["reliable"]})
            if st["reasons"]:
                out[name][f"latency_b{b}_reasons"] = st["reasons"]
    return out


def measure(path, data: DataSplits, threads: int, warmup: int, repeats: tuple[int, int],
            reference: Optional[torch.Tensor] = None) -> dict:
    """val_metrics and latencies of one ONNX file."""
    return {**val_metrics(path, data, threads, reference), **latencies({"f": path}, data, threads, warmup, repeats)["f"]}


def _make(mode: str, src, dst, run: Run, data: DataSplits, qat: Optional[Callable]) -> dict:
    """Write one int8 candidate, read its scheme, check its kernels against its exact arithmetic, label the file."""
    cfg = run.recipe.quantize
    extra = None
    if mode == "static":
        quantize_static(src, dst, _calibration(run, data, src), cfg)
    elif mode == "dynamic":
        quantize_dynamic(src, dst, cfg)
    else:
        if qat is None:
            raise CompressError("quantize.mode qat needs the teacher; run it through `protege compress` or the recipe")
        extra = qat(dst)
    checked = {"scheme": scheme(dst, mode), "verification": verify(dst, data.val.x, src, threads=run.recipe.eval.threads)}
    stamp(dst, describe(data, run.recipe.task), int8=checked["scheme"])
    return {**(extra or {}), **checked}


def quantize_stage(run: Run, data: DataSplits, qat: Optional[Callable] = None) -> dict:
    """Make the int8 candidates the recipe asks for, measure them on the validation split, keep one.

    ``auto`` compares fp32, static and dynamic int8 on this machine (latency in interleaved rounds) and keeps the
    fastest within ``quantize.tolerance`` of fp32 validation accuracy (the test split is not used to choose).
    """
    cfg = run.recipe.quantize
    src = run.pruned_onnx if run.pruned_onnx.is_file() else run.onnx_path
    if not src.is_file():
        raise CompressError(f"{run.path} has no exported ONNX student to quantize ({src.name}); run `protege export {run.path}` first")
    run.quant_dir.mkdir(exist_ok=True)
    e = run.recipe.eval
    wanted = {"auto": ["static", "dynamic"], "int8": ["static", "dynamic"], "static": ["static"], "dynamic": ["dynamic"], "qat": ["qat"]}[cfg.mode]
    if data.is_text:  # token ids cannot be calibrated like activations; the int8 route for transformers is dynamic
        wanted = [m for m in wanted if m == "dynamic"]
    reference = ort_logits(ort_session(src, e.threads), data.val.x).argmax(-1)
    candidates, failed, files = {"fp32": {**val_metrics(src, data, e.threads), "file": src.name}}, {}, {"fp32": src}
    for mode in wanted:
        dst = run.quant_dir / f"{mode}.onnx"
        try:
            candidates[mode] = {**_make(mode, src, dst, run, data, qat), **val_metrics(dst, data, e.threads, reference)}
            files[mode] = dst
        except Exception as err:  # ONNX Runtime raises its own types (not RuntimeError) for a file it cannot run
            ort_error = type(err).__module__.startswith("onnxruntime")
            if ort_error and cfg.mode not in ("auto", "int8"):
                raise CompressError(f"{mode} int8: ONNX Runtime cannot run {dst.name} ({type(err).__name__}: "
                                    f"{str(err).splitlines()[0][:160] if str(err) else ''}); try another quantize.mode") from None
            if cfg.mode not in ("auto", "int8") or not (ort_error or isinstance(err, (CompressError, RuntimeError, ValueError))):
                raise
            failed[mode] = str(err)
            log.info(f"quantize: {mode} int8 skipped: {err}")
    for name, lat in latencies(files, data, e.threads, e.warmup, (e.repeats_b1, e.repeats_b32), e.rounds).items():
        candidates[name].update(lat)
    _log_candidates(candidates, len(data.val))
    if cfg.mode in ("auto", "int8"):
        chosen, reason = choose(candidates, cfg)
    else:
        chosen, reason = wanted[0], f"quantize.mode is {cfg.mode}"
    if chosen == "fp32":
        run.int8_path.unlink(missing_ok=True)
        log.info(f"quantize: kept fp32 ({reason}); no int8 file is deployed")
    else:
        _copy(run.quant_dir / f"{chosen}.onnx", run.int8_path)
        log.info(f"quantize: chose {chosen} int8 -> {run.int8_path} ({reason})")
    choice = {"mode": cfg.mode, "chosen": chosen, "reason": reason, "source": src.name, "candidates": candidates,
              "failed": failed, "selected_on": "validation split", "config": cfg.model_dump(), "target": cfg.target}
    if chosen != "fp32":
        choice.update(scheme=candidates[chosen]["scheme"], verification=candidates[chosen]["verification"])
    write_atomic(run.quant_dir / "choice.json", json.dumps(choice, indent=2))
    return choice


def _log_candidates(candidates: dict, n_val: int) -> None:
    fp32 = candidates["fp32"]
    mark = lambda c, b: "" if c.get(f"latency_b{b}_reliable", True) else "?"  # noqa: E731
    for mode, c in candidates.items():
        if mode == "fp32":
            continue
        log.info(f"quantize: {mode} int8 ({c['scheme']['weights']}) {c['bytes'] / 1024:.1f} kB, val acc {c['val_accuracy']:.4f} "
            f"(fp32 {fp32['val_accuracy']:.4f}), p50 b1 {c['latency_ms_b1']:.3f}{mark(c, 1)} ms / b32 {c['latency_ms_b32']:.3f}{mark(c, 32)} ms "
            f"(fp32 {fp32['latency_ms_b1']:.3f}{mark(fp32, 1)} / {fp32['latency_ms_b32']:.3f}{mark(fp32, 32)}); "
            + (f"int8 kernels match the exact QDQ arithmetic on {n_val} validation examples" if c["verification"]["independent"]
               else c["verification"]["note"]))


def _copy(src, dst) -> None:
    import shutil

    tmp = dst.with_suffix(".tmp.onnx")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def qat_fn(run: Run, data: DataSplits, teachers: list[nn.Module], acc: Accelerator):
    """Quantization-aware training of the final student (pruned, if it was) with the recipe's Distiller."""
    def go(dst: Path) -> dict:
        r, q = run.recipe, run.recipe.quantize
        model = run.load_pruned(data)
        model = run.load_student(data) if model is None else model
        loss = student_loss(run, data, teachers, acc, features=False, views=False)  # (QAT does not augment)
        return qat_to_onnx(model, loss, data.train, data.val, dst, epochs=q.qat_epochs,
                           lr=q.qat_lr or r.train.lr / 10, batch_size=r.train.batch_size, seed=r.seed,
                           portable=q.target == "portable", accelerator=acc, ckpt_dir=run.quant_dir / "qat_checkpoints",
                           metrics_path=run.metrics_path)

    return go
