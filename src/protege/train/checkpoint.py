"""Training checkpoints as one safetensors file: model, optimizer, scheduler, RNG and loop state.

One file written to a temporary name and renamed, so a kill at any moment leaves the previous
checkpoint intact and ``--resume`` continues bit-exactly on CPU.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, loop: dict[str, Any]) -> None:
    from ..models.loading import unshared

    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in unshared(model.state_dict()).items()}
    opt = optimizer.state_dict()
    opt_meta: dict[str, Any] = {"param_groups": opt["param_groups"], "state": {}}
    for pid, st in opt["state"].items():
        opt_meta["state"][str(pid)] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
                opt_meta["state"][str(pid)][k] = "tensor"
            else:
                opt_meta["state"][str(pid)][k] = v
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"loop": json.dumps(loop), "optim": json.dumps(opt_meta), "sched": json.dumps(scheduler.state_dict())}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    from ..models.loading import with_tied

    model.load_state_dict(with_tied(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}))
    opt_meta = json.loads(meta["optim"])
    state = {}
    for pid, st in opt_meta["state"].items():
        state[int(pid)] = {k: (tensors[f"optim.{pid}.{k}"] if v == "tensor" else v) for k, v in st.items()}
    optimizer.load_state_dict({"state": state, "param_groups": opt_meta["param_groups"]})
    scheduler.load_state_dict(json.loads(meta["sched"]))
    torch.set_rng_state(tensors["rng.torch"])
    return json.loads(meta["loop"])
