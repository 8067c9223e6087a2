"""The pruning stage of a run: check the settings before anything is written, then prune a copy of the student
step by step, recovering by distillation after each step (the same fit loop), and save the smaller model."""
from __future__ import annotations

import copy
import json
import logging

from accelerate import Accelerator
from torch import nn

from ..compress.prune import conv_groups, make_permanent, plan, prune_
from ..compress.quantize import check_calibration, load_calibration
from ..data import DataSplits
from ..errors import CompressError
from ..files import write_atomic
from ..models import save_weights
from ..run import Run
from ..train import fit
from .teacher import augmentation

log = logging.getLogger(__name__)


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


def prune_stage(run: Run, data: DataSplits, student: nn.Module, loss_fn, acc: Accelerator) -> nn.Module:
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
        log.info(f"prune step {i}/{len(ratios)}: {cfg.method} {ratio:.3f} -> {res.params_after:,} params "
            f"({res.sparsity:.1%} {'removed' if cfg.method == 'structured' else 'zero'})")
        entry = res.as_dict()
        if cfg.finetune_epochs:
            result = fit(model, loss_fn, data.train, data.val, ft, seed=r.seed + i, ckpt_dir=run.path / "pruned" / "checkpoints",
                         metrics_path=run.metrics_path, stage=f"prune{i}", accelerator=acc, augment=augmentation(run, loss_fn),
                         lr_field="prune.finetune_lr")
            entry["recovery"] = {"epochs": ft.epochs, "lr": ft.lr, "best_epoch": result.best_epoch,
                                 "best_val_accuracy": result.best_val_accuracy}
        steps.append(entry)
    make_permanent(model)
    model = model.cpu().eval()
    if acc.is_main_process:  # config first: the weights file is what marks the stage finished for --resume
        (run.path / "pruned").mkdir(exist_ok=True)
        info = {"model": r.student.model, "kwargs": r.student.kwargs, "params": sum(p.numel() for p in model.parameters()),
                "conv_groups": conv_groups(model), "prune": cfg.model_dump(), "steps": steps}
        write_atomic(run.path / "pruned" / "config.json", json.dumps(info, indent=2))
        save_weights(model, run.pruned_weights)
    acc.wait_for_everyone()
    return model


