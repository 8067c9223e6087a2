"""Training checkpoints as one safetensors file: model, optimizer, scheduler, RNG and loop state.

``save_checkpoint`` writes the new checkpoint to a temporary name, keeps the one it replaces as
``last.prev.safetensors`` (a hard link, so no copy), then renames the new one into place: a kill at any
moment leaves ``last.safetensors`` complete, and ``--resume`` continues bit-exactly on CPU. Each file
carries a sha256 of its tensors and state; ``load_checkpoint`` falls back to the previous checkpoint
(one epoch earlier) when the last one is truncated or damaged, and says so.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import StorageError
from ..files import write_error, write_fix
from ..models.loading import tied_groups, with_tied

log = logging.getLogger(__name__)


def previous(path: Path) -> Path:
    """Where the checkpoint before ``path`` is kept: last.safetensors -> last.prev.safetensors."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def temporary_files(path: Path) -> list[Path]:
    """The temporary names ``save_checkpoint`` writes beside ``path`` (left behind only by a kill)."""
    path = Path(path)
    return [path.with_suffix(".tmp"), previous(path).with_suffix(".tmp")]


def _digest(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """sha256 over the state (JSON) and every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous().reshape(-1)
        h.update(f"\0{k}\0{t.dtype}\0{tuple(tensors[k].shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def _reason(e: BaseException) -> str:
    if isinstance(e, _Missing):
        return "missing"
    text = str(e).splitlines()[0][:160] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state as CPU tensors under "model.", a tied tensor (a language model's input and output embeddings)
    once, under its first key in state-dict order (``with_tied`` ties it again on load). Weights files leave this to
    safetensors' save_model; a checkpoint cannot, as it holds the optimizer's tensors beside the model's in one file."""
    aliases = {k for group in tied_groups(model) for k in group[1:]}
    return {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in aliases}


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, loop: dict[str, Any]) -> None:
    """Write the checkpoint; the one it replaces becomes ``previous(path)``. A failed write (full disk, no
    permission) raises StorageError naming the file and leaves the earlier checkpoints as they were."""

    path = Path(path)
    tensors = _model_tensors(model)
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
    meta["sha256"] = _digest(tensors, meta)
    tmp, prev_tmp = temporary_files(path)
    prev = previous(path)
    try:
        save_file(tensors, str(tmp), metadata=meta)
        # The previous file must be this checkpoint's predecessor (one epoch earlier, same training): keep the one
        # being replaced if it is that, else any older one if that is; never a damaged or stale one.
        if _epoch_of(path) == loop["epoch"] - 1:  # last stays complete throughout: link, then rename over it
            prev_tmp.unlink(missing_ok=True)
            try:
                os.link(path, prev_tmp)
            except OSError:  # no hard links on this file system: a copy instead
                import shutil

                shutil.copyfile(path, prev_tmp)
            os.replace(prev_tmp, prev)
        elif _epoch_of(prev) != loop["epoch"] - 1:
            prev.unlink(missing_ok=True)
        os.replace(tmp, path)
    except (SafetensorError, OSError) as e:  # safetensors reports a full disk as SafetensorError, not OSError
        tmp.unlink(missing_ok=True)
        prev_tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write the checkpoint {path} ({write_error(e)}; the checkpoint saved before is intact); "
                           f"{write_fix(e, path)}, then continue with --resume") from None


def _epoch_of(path: Path) -> Optional[int]:
    """The epoch a checkpoint file says it holds (its header only, no checksum), or None if it has none."""
    try:
        with safe_open(str(path), framework="pt") as f:
            epoch = json.loads((f.metadata() or {})["loop"])["epoch"]
        return epoch if isinstance(epoch, int) else None
    except Exception:  # missing, truncated, not safetensors, no loop state: not a usable predecessor
        return None


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The checkpoint's tensors and decoded state, checked against its sha256 (files written before the
    checksum existed are taken as they are)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    expected = meta.pop("sha256", None)
    if expected is not None and _digest(tensors, meta) != expected:
        raise ValueError("its contents do not match the checksum it was written with")
    state = {"loop": json.loads(meta["loop"]), "optim": json.loads(meta["optim"]), "sched": json.loads(meta["sched"])}
    if "rng.torch" not in tensors or not isinstance(state["loop"].get("epoch"), int):
        raise ValueError("it lacks the RNG or loop state")
    return tensors, state


def _apply(tensors: dict[str, torch.Tensor], state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
           scheduler: Any) -> dict[str, Any]:

    model.load_state_dict(with_tied(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}))
    opt_state = {}
    for pid, st in state["optim"]["state"].items():
        opt_state[int(pid)] = {k: (tensors[f"optim.{pid}.{k}"] if v == "tensor" else v) for k, v in st.items()}
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["optim"]["param_groups"]})
    scheduler.load_state_dict(state["sched"])
    torch.set_rng_state(tensors["rng.torch"])
    return state["loop"]


class _Missing(OSError):
    def __str__(self) -> str:
        return "missing"


def _load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    if not path.is_file():
        raise _Missing()
    return _apply(*_read(path), model, optimizer, scheduler)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG from ``path``; returns the loop state.

    If ``path`` is missing, truncated or damaged, the previous checkpoint (one epoch earlier) is used and
    a warning says so; if that one cannot be used either, StorageError names both files and the fix.
    """
    path = Path(path)
    try:
        return _load(path, model, optimizer, scheduler)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, IndexError) as e:
        why = _reason(e)
    prev = previous(path)
    try:
        loop = _load(prev, model, optimizer, scheduler)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, IndexError) as e:
        raise StorageError(f"cannot resume: the checkpoint {path} is unusable ({why}) and so is the previous one, {prev} "
                           f"({_reason(e)}); start again without --resume (with --overwrite)") from None
    log.warning(f"checkpoint {path} is unusable ({why}); resuming from the previous one, {prev} (epoch {loop['epoch']})")
    return loop


def load_checkpoint_weights(path: Path, model: nn.Module) -> int:
    """Load only the model weights of the checkpoint ``path`` into ``model`` (the weights of the epoch it holds; a
    student trained with adapters or an EMA teacher beside it is stored under ``student.``); returns that epoch."""
    try:
        tensors, state = _read(Path(path))
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise StorageError(f"cannot read the checkpoint {path} ({_reason(e)}); train the run again with --overwrite") from None
    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    if any(k.startswith("student.") for k in weights) and not any(k.startswith("student.") for k in model.state_dict()):
        weights = {k[8:]: v for k, v in weights.items() if k.startswith("student.")}
    model.load_state_dict(with_tied(model, weights))
    return int(state["loop"]["epoch"])
