"""Build a model from a spec: zoo name, user ``file.py:factory``, or an ONNX file run by ONNX Runtime."""
from __future__ import annotations

import importlib.util
import logging
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

from ..errors import ModelError, StorageError
from ..files import write_error, write_fix
from .config import ModelSpec
from .lm import causal_lm
from .text import hf_classifier, is_hf_folder
from .vision import (folder_normalization, hf_image_classifier, is_image_classifier_folder, is_library_model, library_model,
                     normalize_inputs_)
from .zoo import ZOO

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")


class OnnxModule(nn.Module):
    """An ONNX file used as a (frozen) teacher, run by ONNX Runtime on CPU: what it returns are the teacher's logits.

    This is how a Keras, TensorFlow or scikit-learn model comes in: export it to ONNX first. ``output`` names the
    output to read (default: the first floating-point one, so skl2onnx's int64 ``label`` is passed over for its
    ``probabilities``). ``in_shape`` (one example, as the data gives it) is checked against the file's input before
    anything runs. An output of probabilities (see ``forward``) is turned into log-probabilities, which are
    logits of the same distribution.
    """

    def __init__(self, path: str | Path, threads: int = 0, output: Optional[str] = None,
                 in_shape: Optional[Sequence[int]] = None, who: str = "teacher", pad_id: Optional[int] = None):
        super().__init__()
        import onnx
        import onnxruntime as ort

        self.path, self.who = Path(path), who
        if not self.path.is_file():
            raise ModelError(f"ONNX file '{self.path}' not found; check {who}.model")
        try:
            proto = onnx.load(str(self.path))
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnx / ORT raise many exception types for a bad file
            raise ModelError(f"'{self.path}' is not a valid ONNX model ({str(e).splitlines()[0][:120]}); re-export it") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(f"{who} {self.path.name} has {len(inputs)} inputs ({_describe_io(inputs)}); protege feeds one "
                             f"tensor per example: export the model with a single input")
        self.input_name, self.input_dtype = inputs[0].name, _INPUT.get(inputs[0].type)
        if self.input_dtype is None:
            raise ModelError(f"{who} {self.path.name}: input '{inputs[0].name}' is {inputs[0].type}; protege feeds float "
                             f"tensors (token ids as int64): export the model with such an input")
        if in_shape is not None:
            _check_input(inputs[0], tuple(in_shape), f"{who} {self.path.name}")
        self.output_name = _pick_output(self.session.get_outputs(), output, f"{who} {self.path.name}")
        dims = list(inputs[0].shape)
        # token ids cut to a batch's longest text are padded back to a length the file fixes
        self.pad_to = dims[1] if pad_id is not None and len(dims) == 2 and isinstance(dims[1], int) else None
        self.pad_id = pad_id
        self.probabilities: Optional[bool] = None  # decided on the first call: see forward
        self.n_params = int(sum(np.prod(t.dims) for t in proto.graph.initializer))

    def _run(self, x: torch.Tensor) -> np.ndarray:
        if self.pad_to is not None and x.shape[1] < self.pad_to:
            x = torch.nn.functional.pad(x, (0, self.pad_to - x.shape[1]), value=self.pad_id)
        (out,) = self.session.run([self.output_name], {self.input_name: x.detach().cpu().numpy().astype(self.input_dtype)})
        return np.asarray(out, dtype=np.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The output as logits. On the first call the output is read as probabilities when every row is non-negative
        and sums to 1 (a scikit-learn or Keras softmax output); then, from that call on, their logarithm is returned:
        the logits of the same distribution (softened by a temperature as logits are, not as probabilities)."""
        out = self._run(x)
        if self.probabilities is None:
            self.probabilities = is_probabilities(out)
            if self.probabilities:
                log.info(f"{self.who} {self.path.name}: output '{self.output_name}' holds probabilities (rows of non-negative "
                         f"numbers summing to 1); distilling from their logarithm, the equivalent logits")
        out = torch.from_numpy(np.ascontiguousarray(out))
        return out.clamp_min(1e-12).log() if self.probabilities else out


def is_probabilities(out: np.ndarray, atol: float = 1e-4) -> bool:
    """Rows of class scores that are a probability distribution each: non-negative, summing to 1."""
    return bool(out.ndim == 2 and out.shape[1] > 1 and (out >= 0).all() and np.allclose(out.sum(axis=1), 1.0, atol=atol))


_NUMPY = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}  # class scores
_INPUT = {**_NUMPY, "tensor(int64)": np.int64, "tensor(int32)": np.int32}  # what protege can feed (text: token ids)


def _describe_io(args) -> str:
    """"label (tensor(int64), [N]), probabilities (tensor(float), [N, 2])": an ONNX file's inputs or outputs."""
    return ", ".join(f"{a.name} ({a.type}, [{', '.join('N' if not isinstance(d, int) else str(d) for d in a.shape)}])"
                     for a in args)


def _check_input(arg, example: tuple[int, ...], who: str) -> None:
    """The file's input must take (batch, *example): same rank, and every fixed size equal to the data's."""
    dims = list(arg.shape)
    fixed = [d if isinstance(d, int) else None for d in dims[1:]]
    if len(dims) != len(example) + 1 or any(f is not None and f != e for f, e in zip(fixed, example)):
        raise ModelError(f"{who} takes input '{arg.name}' of shape [{', '.join('N' if not isinstance(d, int) else str(d) for d in dims)}] "
                         f"but the data gives examples of shape {list(example)} (batch [N, {', '.join(map(str, example))}]); "
                         f"choose the data's columns (data.columns / data.drop) or data.shape to match the model's input")


def _pick_output(outputs, name: Optional[str], who: str) -> str:
    """The output to read: ``name`` if given (an unknown name lists the file's outputs), else the first float tensor."""
    if name is not None:
        found = next((o for o in outputs if o.name == name), None)
        if found is None:
            raise ModelError(f"{who} has no output '{name}'; its outputs: {_describe_io(outputs)}; set output to one of them")
    else:
        found = next((o for o in outputs if o.type in _NUMPY), None)
        if found is None:
            raise ModelError(f"{who} has no floating-point tensor output ({_describe_io(outputs)}); export scores or "
                             f"probabilities as a float tensor (skl2onnx: options={{'zipmap': False}})")
    if found.type not in _NUMPY:
        raise ModelError(f"{who}: output '{found.name}' is {found.type}, not scores per class; choose another output "
                         f"({_describe_io(outputs)}), or export probabilities as a float tensor (skl2onnx: options={{'zipmap': False}})")
    if found is not outputs[0]:
        log.info(f"{who}: reading its output '{found.name}' ({_describe_io(outputs)})")
    return found.name


def _load_user_factory(ref: str):
    file, _, name = ref.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise ModelError(f"model file '{file}' not found; give `path/to/file.py:factory` relative to where you run protege")
    mod_name = f"protege_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ModelError(f"importing '{file}' failed: {type(e).__name__}: {e}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        found = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_") and getattr(v, "__module__", "") == mod_name]
        raise ModelError(f"'{file}' has no callable '{name}'; callables there: {', '.join(found) or 'none'}")
    return factory


def _call_factory(factory, kwargs: dict[str, Any], in_shape: Sequence[int], num_classes: int, label: str,
                  extras: Optional[dict[str, Any]] = None) -> nn.Module:
    kwargs = dict(kwargs)
    params = inspect.signature(factory).parameters
    for key, value in (("in_shape", tuple(in_shape)), ("num_classes", num_classes), *(extras or {}).items()):
        if key in params and key not in kwargs:
            kwargs[key] = value
    try:
        model = factory(**kwargs)
    except Exception as e:  # a factory may reject its arguments with any exception type
        raise ModelError(f"{label}: cannot build with kwargs {sorted(kwargs)} ({type(e).__name__}: {e}); "
                         f"fix the model's `kwargs` in the recipe") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{label} returned {type(model).__name__}, not a torch.nn.Module; make the factory return the model")
    return model


def build_model(spec: ModelSpec, in_shape: Sequence[int], num_classes: int, extras: Optional[dict[str, Any]] = None) -> nn.Module:
    """Instantiate the model a spec names and load its weights, if any.

    ``extras`` are what the data knows about the input beyond its shape (text: vocab_size, pad_id, max_length);
    a factory receives those it has parameters for.
    """
    ref = spec.model
    if ref.endswith(".onnx"):
        text = bool((extras or {}).get("vocab_size"))
        onnx_model = OnnxModule(ref, output=spec.output, in_shape=None if text else in_shape,
                                pad_id=(extras or {}).get("pad_id", 0) if text else None)
        return _normalized(onnx_model, spec, in_shape)
    if is_hf_folder(ref) and is_image_classifier_folder(ref):
        model = hf_image_classifier(ref, num_classes, in_shape, allow_pickle=spec.allow_pickle, **spec.kwargs)
    elif is_hf_folder(ref) and (extras or {}).get("task") == "causal_lm":
        model = causal_lm(ref, allow_pickle=spec.allow_pickle, **spec.kwargs)
    elif is_hf_folder(ref):
        kwargs = {"pad_id": (extras or {}).get("pad_id", 0), "allow_pickle": spec.allow_pickle, **spec.kwargs}
        model = hf_classifier(ref, num_classes, **kwargs)
    elif is_library_model(ref):
        model = library_model(ref, in_shape, num_classes, spec.kwargs)
    elif ":" in ref:
        model = _call_factory(_load_user_factory(ref), spec.kwargs, in_shape, num_classes, f"factory '{ref}'", extras)
    elif ref in ZOO:
        model = _call_factory(ZOO[ref], spec.kwargs, in_shape, num_classes, f"zoo model '{ref}'", extras)
    else:
        raise ModelError(f"unknown model '{ref}'; use a zoo name ({', '.join(ZOO)}), `file.py:factory`, a Hugging Face "
                         f"model folder, `timm:<name>` / `torchvision:<name>`, or a .onnx file")
    if spec.weights:
        load_weights(model, spec.weights, allow_pickle=spec.allow_pickle)
    return _normalized(model, spec, in_shape)


def _normalized(model: nn.Module, spec: ModelSpec, in_shape: Sequence[int]) -> nn.Module:
    """The model with its own input normalisation (``spec.normalize``; by default a Hugging Face image folder's)."""
    if spec.normalize == "none":
        return model
    if spec.normalize is not None:
        mean, std, source = spec.normalize.mean, spec.normalize.std, "its normalize setting"
    elif is_hf_folder(spec.model) and is_image_classifier_folder(spec.model):
        found = folder_normalization(spec.model)
        if found is None:
            return model
        (mean, std), source = found, f"{Path(spec.model) / 'preprocessor_config.json'}"
        log.info(f"{Path(spec.model).name}: normalising its input with mean {mean} and std {std} (its "
                 f"preprocessor_config.json); it expects images in [0, 1] (data.scaling: none)")
    else:
        return model
    return normalize_inputs_(model, mean, std, int(in_shape[0]) if len(in_shape) > 1 else 1, source)


def read_state_dict(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file '{path}' not found; check the `weights` path")
    if path.suffix != ".safetensors":
        if path.suffix not in PICKLE_SUFFIXES:
            raise ModelError(f"'{path}': unknown weights format '{path.suffix}'; use a .safetensors file")
        if not allow_pickle:
            raise ModelError(f"'{path}' is a pickle file, and unpickling can run arbitrary code; convert it to "
                             f".safetensors, or set `allow_pickle: true` (--allow-pickle) if you trust it")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise ModelError(f"'{path}' could not be unpickled ({type(e).__name__}); re-save the weights as .safetensors") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else getattr(state, "state_dict", lambda: None)()
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelError(f"'{path}' holds no state dict of tensors; save `model.state_dict()` as .safetensors")
        return state
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        why = str(e).splitlines()[0][:160] if str(e).strip() else type(e).__name__
        run = run_folder(path)
        if run is None:  # the user's own file
            raise ModelError(f"'{path}' is not a readable safetensors file ({why}); re-save the weights") from None
        raise StorageError(f"'{path}' is not a readable safetensors file ({why}): it is truncated or damaged; "
                           f"{remake_hint(path, run)}") from None


RUN_FILES = re.compile(r"(teacher|student|pruned)/(model|gen\d+)\.safetensors|(teacher|student|pruned)/(gen\d+_)?checkpoints/"
                       r"(last|best)(\.prev)?\.safetensors|(student|pruned)(\.int8|\.candidate|\.rejected)?\.onnx|quantized/[^/]+\.onnx")


def run_folder(path: str | Path) -> Optional[Path]:
    """The run folder ``path`` is one of protege's own files of (an ancestor holding recipe.yaml, with ``path``
    at a place protege writes to), or None for any other file."""
    path = Path(path)
    for parent in list(path.parents)[:3]:
        if (parent / "recipe.yaml").is_file():
            return parent if RUN_FILES.fullmatch(path.relative_to(parent).as_posix()) else None
    return None


def remake_hint(path: str | Path, run: Path) -> str:
    """How to make a damaged file of the run folder ``run`` again."""
    path = Path(path)
    rel = path.relative_to(run)
    if rel.parts[:1] == ("pruned",) or rel.name in ("pruned.onnx",):
        return f"delete it and redo the pruning with `protege compress {run} --prune RATIO`"
    if rel.parts[:1] == ("quantized",):
        return f"delete it and redo the quantization with `protege compress {run} --quantize MODE`"
    if rel.name.endswith(".int8.onnx"):
        return (f"delete it and redo the quantization with `protege compress {run} --quantize MODE` (`protege export {run}` "
                f"for a causal-LM run)")
    if rel.suffix == ".onnx":
        return f"make it again with `protege export {run}`"
    if path.name == "best.safetensors":  # the best epoch's weights cannot be recovered from the last checkpoint
        return (f"delete the folder {path.parent} and continue with `protege distill RECIPE --out {run} --resume` "
                f"(that stage trains again from the start)")
    return f"delete it and continue with `protege distill RECIPE --out {run} --resume` to make it again"


def load_weights(model: nn.Module, path: str | Path, allow_pickle: bool = False) -> None:
    state = with_tied(model, read_state_dict(path, allow_pickle))
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ModelError(f"weights '{path}' do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}; "
                         f"check the model name and kwargs")
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        k = bad[0]
        raise ModelError(f"weights '{path}': '{k}' has shape {tuple(state[k].shape)}, the model expects {tuple(own[k].shape)}; check kwargs")
    model.load_state_dict(state)


def resize_to(model: nn.Module, path: str | Path, groups: dict[str, int] | None = None) -> nn.Module:
    """Shrink a freshly built model's layers to the shapes in a structured-pruned state dict, then load it.

    Pruned weights are saved as a plain state dict; the model they came from is rebuilt from its recipe
    and each Conv / Linear / BatchNorm / LayerNorm takes the sizes its saved tensors have (``groups``: each
    conv's group count as saved, since pruning a depthwise conv changes it).
    """
    state = read_state_dict(path)
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if groups and name in groups and isinstance(module, nn.modules.conv._ConvNd):
            module.groups = int(groups[name])
        for pname, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            saved = state.get(prefix + pname)
            if saved is not None and p is not None and saved.shape != p.shape:
                new = torch.empty_like(saved, dtype=p.dtype)
                if isinstance(p, nn.Parameter):
                    setattr(module, pname, nn.Parameter(new, requires_grad=p.requires_grad))
                else:
                    module.register_buffer(pname, new)
        w = state.get(prefix + "weight")
        if w is None:
            continue
        if isinstance(module, nn.modules.conv._ConvTransposeNd):  # weight: (in, out / groups, *kernel)
            module.in_channels, module.out_channels = w.shape[0], w.shape[1] * module.groups
        elif isinstance(module, nn.modules.conv._ConvNd):  # weight: (out, in / groups, *kernel)
            module.out_channels, module.in_channels = w.shape[0], w.shape[1] * module.groups
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = w.shape
        elif isinstance(module, nn.modules.batchnorm._NormBase):
            module.num_features = w.shape[0]
        elif isinstance(module, nn.LayerNorm):
            module.normalized_shape = tuple(w.shape)
    load_weights(model, path)
    return model


def _storage_key(v: torch.Tensor) -> tuple:
    return v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype


def tied_groups(model: nn.Module) -> list[list[str]]:
    """State-dict keys of ``model`` that are one tensor (a language model's tied input and output embeddings), each
    group in state-dict order; keys that are no other key's tensor are left out."""
    groups: dict[tuple, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        groups.setdefault(_storage_key(v.detach()), []).append(k)
    return [g for g in groups.values() if len(g) > 1]


def with_tied(model: nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """``state`` plus the keys of ``model``'s tied groups that a file stored once: each filled from the member the
    file has, whichever that is (``save_weights`` keeps the one safetensors' save_model picks, files written before
    it and checkpoints the first in state-dict order)."""
    state = dict(state)
    for group in tied_groups(model):
        kept = next((prefix + k for k in group if prefix + k in state), None)
        if kept is not None:
            for k in group:
                state.setdefault(prefix + k, state[kept])
    return state


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Atomic safetensors save (write to a temporary file, then rename) through safetensors' save_model, which
    stores tied tensors once (``with_tied`` ties them again on load)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        save_model(model, str(tmp))
        os.replace(tmp, path)
    except (SafetensorError, OSError) as e:  # safetensors reports a full disk as SafetensorError, not OSError
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write the weights file {path} ({write_error(e)}); {write_fix(e, path)}, then run the "
                           f"command again (with --resume for `protege distill`)") from None
    except RuntimeError as e:
        tmp.unlink(missing_ok=True)
        if "no suitable name to keep" not in str(e):
            raise
        raise ModelError(f"cannot save the weights to {path}: a parameter or buffer is a slice of a larger tensor, which "
                         f"safetensors does not store; make it a tensor of its own (.clone()) in the model") from None


def num_params(model: nn.Module) -> int:
    if isinstance(model, OnnxModule):
        return model.n_params
    return sum(p.numel() for p in model.parameters())
