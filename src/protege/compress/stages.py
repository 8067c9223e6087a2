"""The compression stages of a run: prune the student (recovering by distillation), then int8 in ONNX Runtime.

Each stage reads what the previous one wrote in the run folder and writes its own files; the
pipeline passes in the training loss (the same Distiller the student was trained with).
"""
from __future__ import annotations

import copy
import json
import os
from typing import Callable, Optional

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from ..data import DataSplits
from ..errors import CompressError
from ..evaluate.profile import ort_latency
from ..export.onnx import ort_logits, ort_session
from ..models import save_weights
from ..run import Run
from ..train import fit
from .prune import conv_groups, make_permanent, plan, prune_
from .quantize import check_calibration, choose, load_calibration, quantize_dynamic, quantize_static

Log = Callable[[str], None]


def precheck(run: Run, data: DataSplits, student: nn.Module) -> None:
    """Fail on bad settings (prune amounts, layer names, calibration data) before anything is written."""
    r = run.recipe
    if r.prune:
        probe = copy.deepcopy(student).eval()
        for ratio in plan(probe, data.train.x[:2], r.prune):
            prune_(probe, r.prune, data.train.x[:2], ratio=ratio)
    if r.quantize and data.is_text and r.quantize.mode in ("static", "qat"):
        raise CompressError(f"quantize.mode {r.quantize.mode} is for models with float inputs; a text model's input is token "
                            f"ids, so use quantize.mode: dynamic (auto and int8 try dynamic only for text)")
    if r.quantize and r.quantize.calibration_data and r.quantize.mode in ("auto", "int8", "static"):
        calib = load_calibration(r.quantize.calibration_data)
        check_calibration(calib, tuple(data.input_shape), f"'{r.quantize.calibration_data}'")


def prune_stage(run: Run, data: DataSplits, student: nn.Module, loss_fn, acc: Accelerator, log: Log) -> nn.Module:
    """Prune a copy of the student step by step, distilling after each step; save pruned/model.safetensors."""
    r = run.recipe
    cfg = r.prune
    model = copy.deepcopy(student).cpu().eval()
    example = data.train.x[:2]
    ratios = plan(model, example, cfg)
    ft = r.train.model_copy(update={"epochs": max(cfg.finetune_epochs, 1), "lr": cfg.finetune_lr or r.train.lr / 5})
    steps = []
    for i, ratio in enumerate(ratios, 1):
        res = prune_(model, cfg, example, ratio=ratio)
        log(f"prune step {i}/{len(ratios)}: {cfg.method} {ratio:.3f} -> {res.params_after:,} params "
            f"({res.sparsity:.1%} {'removed' if cfg.method == 'structured' else 'zero'})")
        entry = res.as_dict()
        if cfg.finetune_epochs:
            result = fit(model, loss_fn, data.train, data.val, ft, seed=r.seed + i, ckpt_dir=run.path / "pruned" / "checkpoints",
                         metrics_path=run.metrics_path, stage=f"prune{i}", accelerator=acc, augment=r.train.augment)
            entry["recovery"] = {"epochs": ft.epochs, "lr": ft.lr, "best_epoch": result.best_epoch,
                                 "best_val_accuracy": result.best_val_accuracy}
        steps.append(entry)
    make_permanent(model)
    model = model.cpu().eval()
    if acc.is_main_process:  # config first: the weights file is what marks the stage finished for --resume
        (run.path / "pruned").mkdir(exist_ok=True)
        info = {"model": r.student.model, "kwargs": r.student.kwargs, "params": sum(p.numel() for p in model.parameters()),
                "conv_groups": conv_groups(model), "prune": cfg.model_dump(), "steps": steps}
        _write_json(run.path / "pruned" / "config.json", info)
        save_weights(model, run.pruned_weights)
    acc.wait_for_everyone()
    return model


def _write_json(path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _calibration(run: Run, data: DataSplits, src) -> np.ndarray:
    cfg = run.recipe.quantize
    if cfg.calibration_data:
        return check_calibration(load_calibration(cfg.calibration_data), src, f"'{cfg.calibration_data}'")
    g = torch.Generator().manual_seed(run.recipe.seed)
    idx = torch.randperm(len(data.train), generator=g)[: cfg.calibration_size]
    return check_calibration(data.train.x[idx].numpy(), src, f"(training split, {len(idx)} examples)")


def measure(path, data: DataSplits, threads: int, warmup: int, repeats: tuple[int, int],
            reference: Optional[torch.Tensor] = None) -> dict:
    """Validation accuracy, agreement with the fp32 file's predictions, size and p50 latency of one ONNX file."""
    logits = ort_logits(ort_session(path, threads), data.val.x)
    pred = logits.argmax(-1)
    out = {"file": path.name, "bytes": path.stat().st_size, "val_accuracy": float((pred == data.val.y).float().mean())}
    if reference is not None:
        out["val_agreement_fp32"] = float((pred == reference).float().mean())
    for b, n in zip((1, 32), repeats):
        out[f"latency_ms_b{b}"] = ort_latency(path, data.test.x[:1] if data.is_text else data.input_shape, b, threads, warmup, n)["p50"]
    return out


def quantize_stage(run: Run, data: DataSplits, log: Log, qat: Optional[Callable] = None) -> dict:
    """Make the int8 candidates the recipe asks for, measure them on the validation split, keep one.

    ``auto`` compares fp32, static and dynamic int8 on this machine and keeps the fastest within
    ``quantize.tolerance`` of fp32 validation accuracy (the test split is not used to choose).
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
    repeats = (e.repeats_b1, e.repeats_b32)
    fp32 = measure(src, data, e.threads, e.warmup, repeats)
    reference = ort_logits(ort_session(src, e.threads), data.val.x).argmax(-1)
    candidates, failed = {"fp32": {**fp32, "file": src.name}}, {}
    for mode in wanted:
        dst, extra = run.quant_dir / f"{mode}.onnx", None
        try:
            if mode == "static":
                quantize_static(src, dst, _calibration(run, data, src), cfg)
            elif mode == "dynamic":
                quantize_dynamic(src, dst, cfg)
            else:
                if qat is None:
                    raise CompressError("quantize.mode qat needs the teacher; run it through `protege compress` or the recipe")
                extra = qat(dst)
            measured = measure(dst, data, e.threads, e.warmup, repeats, reference)
        except Exception as err:  # ONNX Runtime raises its own types for a file it cannot run
            if cfg.mode not in ("auto", "int8") or not isinstance(err, (CompressError, RuntimeError, ValueError)):
                raise
            failed[mode] = str(err)
            log(f"quantize: {mode} int8 skipped: {err}")
            continue
        candidates[mode] = measured
        if mode == "qat":
            candidates[mode].update(extra or {})
        c = candidates[mode]
        log(f"quantize: {mode} int8 {c['bytes'] / 1024:.1f} kB, val acc {c['val_accuracy']:.4f} (fp32 {fp32['val_accuracy']:.4f}), "
            f"p50 b1 {c['latency_ms_b1']:.3f} ms / b32 {c['latency_ms_b32']:.3f} ms (fp32 {fp32['latency_ms_b1']:.3f} / {fp32['latency_ms_b32']:.3f})")
    if cfg.mode in ("auto", "int8"):
        chosen, reason = choose(candidates, cfg)
    else:
        chosen, reason = wanted[0], f"quantize.mode is {cfg.mode}"
    if chosen == "fp32":
        run.int8_path.unlink(missing_ok=True)
        log(f"quantize: kept fp32 ({reason}); no int8 file is deployed")
    else:
        _copy(run.quant_dir / f"{chosen}.onnx", run.int8_path)
        log(f"quantize: chose {chosen} int8 -> {run.int8_path} ({reason})")
    choice = {"mode": cfg.mode, "chosen": chosen, "reason": reason, "source": src.name, "candidates": candidates,
              "failed": failed, "selected_on": "validation split", "config": cfg.model_dump()}
    _write_json(run.quant_dir / "choice.json", choice)
    return choice


def _copy(src, dst) -> None:
    import shutil

    tmp = dst.with_suffix(".tmp.onnx")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
