"""Quantization-aware training with the teacher (fake-quant + distillation), exported as int8 ONNX.

The maintained PyTorch route is PT2E in torchao (``torch.ao.quantization``'s eager QAT is deprecated and
``torch.ao.quantization.quantize_pt2e`` is gone from torch 2.13): capture the student with
``torch.export``, insert fake-quant with the x86 quantizer (uint8 activations, per-channel symmetric
int8 weights: what ONNX Runtime's int8 kernels expect), train with the Distiller, convert, and export
QuantizeLinear/DequantizeLinear pairs that ONNX Runtime fuses into QLinearConv / QGemm.
(Jacob et al. 2018 for the fake-quant scheme; BatchNorm is folded into the conv weights while training.)
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from ..data import Split
from ..errors import CompressError
from ..export.onnx import _first_arg, ort_logits, ort_session
from ..logs import quiet
from ..train.fit import Hooks, TrainConfig, fit
from .verify import PORTABLE_MAX

log = logging.getLogger(__name__)


def _pt2e(portable: bool = True):
    try:
        with quiet(stdout=True, stderr=True, root=True):
            from torchao.quantization import pt2e
            from torchao.quantization.pt2e.quantize_pt2e import (
                convert_pt2e,
                prepare_qat_pt2e,
            )
            from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
                X86InductorQuantizer,
                get_default_x86_inductor_quantization_config,
            )
    except ImportError as e:
        raise CompressError(f"quantize.mode qat needs torchao's PT2E ({e}); reinstall protege (`make install`)") from None
    config = get_default_x86_inductor_quantization_config(is_qat=True)
    if portable:  # the same 7-bit weights (|w| <= 64) as ONNX Runtime's reduce_range: exact on every CPU (verify.py)
        config = dataclasses.replace(config, weight=dataclasses.replace(config.weight, quant_min=-PORTABLE_MAX, quant_max=PORTABLE_MAX))
    quantizer = X86InductorQuantizer().set_global(config)
    # The conv(+BN)+add(+ReLU) patterns are annotated for Inductor's fused int8 conv-add kernels: they leave the
    # conv output unquantized. ONNX Runtime has no such fusion, so in a ResNet those convs ran in float between
    # layout transposes (ResNet-20 was 2.5x slower than fp32). Without them every conv is a QLinearConv and the
    # residual add runs on dequantized inputs (measured: ResNet-20 batch 32, 16.5 -> 5.4 ms).
    for name in ("_annotate_qat_conv2d_bn_binary_unary", "_annotate_qat_conv2d_bn_binary",
                 "_annotate_conv2d_binary_unary", "_annotate_conv2d_binary"):
        setattr(quantizer, name, lambda *args, **kwargs: None)
    return pt2e, prepare_qat_pt2e, convert_pt2e, quantizer


def _qat_hooks(pt2e, prepared: torch.fx.GraphModule, model: nn.Module, epochs: int, lr: float) -> Hooks:
    """The fit loop's hooks for QAT: the exported graph's own training mode; in the last epoch (of two or more: one
    epoch alone must still calibrate the observers) observers and BatchNorm statistics frozen at a tenth of the
    learning rate; weights pruned to zero (unstructured) kept at zero after every step; the last epoch kept."""
    params = dict(prepared.named_parameters())
    zeros = {n: (p == 0) for n, p in model.named_parameters() if n in params and p.dim() > 1 and bool((p == 0).any())}

    def epoch_start(epoch: int, opt, sched) -> None:
        if epochs > 1 and epoch == epochs - 1:
            prepared.apply(pt2e.disable_observer)
            _freeze_batchnorm(prepared)
            for group in opt.param_groups:
                group["lr"] = lr / 10
            sched.base_lrs = [lr / 10 for _ in sched.base_lrs]  # the constant schedule keeps it there
            log.info("qat: last epoch with observers and BatchNorm frozen, learning rate / 10")

    @torch.no_grad()
    def after_step() -> None:
        for name, mask in zeros.items():
            params[name].masked_fill_(mask, 0.0)

    return Hooks(train_mode=pt2e.move_exported_model_to_train, epoch_start=epoch_start, after_step=after_step,
                 select_best=False, shuffle_stride=7919)


def _freeze_batchnorm(gm: torch.fx.GraphModule) -> None:
    """Stop BatchNorm statistics from moving (the graph's batch_norm ``training`` argument -> False)."""
    for node in gm.graph.nodes:
        if node.target == torch.ops.aten.batch_norm.default:
            args = list(node.args)
            args[5] = False
            node.args = tuple(args)
    gm.recompile()


def _convert_with_trained_scales(prepared: torch.fx.GraphModule, convert_pt2e) -> torch.fx.GraphModule:
    """Convert using the scales the fused fake-quant kernels trained with.

    torchao 0.18's convert recomputes weight scales with a slightly different symmetric formula than the
    fused kernel used in training, which moves some weights by one int8 step; reading the kernel's own
    buffers makes the exported model the one that was trained (an upstream flag for this is pending).
    """
    for mod in prepared.modules():
        if type(mod).__name__ == "FusedMovingAvgObsFakeQuantize":
            mod.calculate_qparams = lambda m=mod: (m.scale.detach().clone(), m.zero_point.detach().clone())
    with quiet(stdout=True, stderr=True, root=True):
        return convert_pt2e(prepared)


def qat_to_onnx(student: nn.Module, loss_fn, train: Split, val: Split, out: Path, *, epochs: int, lr: float,
                batch_size: int, seed: int, portable: bool = True, accelerator: Optional[Accelerator] = None,
                ckpt_dir: Optional[Path] = None, metrics_path: Optional[Path] = None) -> dict:
    """Fine-tune a copy of ``student`` with fake-quant and ``loss_fn`` (the Distiller) through the fit loop; write
    int8 ONNX to ``out``.

    The last epoch runs with frozen observers and BatchNorm statistics at a tenth of the learning rate, so
    the exported scales are the ones the weights adapted to. ``portable``: 7-bit weights (see verify.py).
    The export is checked against the PyTorch int8 model through the file's exact QDQ arithmetic (graph
    optimisations off), so the check does not depend on this CPU's int8 kernels. Returns measurements of the export.
    ``ckpt_dir``: the fit loop's checkpoints (default: beside ``out``); ``metrics_path``: its metrics.jsonl rows.
    """
    pt2e, prepare_qat_pt2e, convert_pt2e, quantizer = _pt2e(portable)
    torch.manual_seed(seed)
    model = copy.deepcopy(student).train().requires_grad_(True)  # a teacher-frozen copy must train
    batch = torch.export.Dim("batch", min=1, max=65536)
    arg = _first_arg(model)
    try:
        with quiet(stdout=True, stderr=True, root=True):
            graph = torch.export.export(model, (train.x[:4],), dynamic_shapes={arg: {0: batch}}).module()
            prepared = prepare_qat_pt2e(graph, quantizer)
    except Exception as e:
        raise CompressError(f"QAT could not capture the student with torch.export ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160]}); use quantize.mode: static") from None
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, optimizer="adamw", lr=lr, weight_decay=0.0, schedule="constant")
    train, val = (dataclasses.replace(s, pad_id=None) for s in (train, val))  # the captured graph fixes the text length
    fit(prepared, loss_fn, train, val, cfg, seed=seed, ckpt_dir=ckpt_dir or out.parent / f"{out.stem}_checkpoints",
        metrics_path=metrics_path, stage="qat", accelerator=accelerator or Accelerator(cpu=True), lr_field="quantize.qat_lr",
        hooks=_qat_hooks(pt2e, prepared, model, epochs, lr))
    pt2e.move_exported_model_to_eval(prepared)
    prepared.apply(pt2e.disable_observer)  # evaluation must not move the activation ranges
    converted = _convert_with_trained_scales(prepared, convert_pt2e)
    pt2e.move_exported_model_to_eval(converted)
    converted.training = False
    tmp = out.with_suffix(".tmp.onnx")
    try:
        with quiet(stdout=True, stderr=True, root=True):
            prog = torch.onnx.export(converted, (val.x[:2],), dynamo=True, opset_version=21, input_names=["input"],
                                     output_names=["logits"], dynamic_shapes={arg: {0: "batch"}}, verbose=False)
            prog.save(str(tmp))
        fuse_for_ort(tmp)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise CompressError(f"exporting the QAT model to ONNX failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    with torch.no_grad():
        expected = torch.cat([converted(val.x[i:i + 256]) for i in range(0, len(val.x), 256)])
    got = ort_logits(ort_session(tmp, optimize=False), val.x)
    agree = float((expected.argmax(-1) == got.argmax(-1)).float().mean())
    if not math.isfinite(float(got.abs().max())) or agree < 0.98:
        tmp.replace(out.with_suffix(".rejected.onnx"))
        raise CompressError(f"the QAT ONNX file (its QDQ arithmetic, no int8 kernels) agrees with the PyTorch int8 model on only "
                            f"{agree:.1%} of validation examples; kept as {out.with_suffix('.rejected.onnx').name} for inspection")
    os.replace(tmp, out)
    return {"val_agreement_torch_int8": agree, "max_abs_diff_torch_int8": float((expected - got).abs().max())}


def fuse_for_ort(path: Path) -> None:
    """Make every compute op of the exported QDQ graph int8 in ONNX Runtime, and drop debug metadata.

    - ReduceMean over H, W (from global average pooling) -> GlobalAveragePool, which ORT runs in int8;
    - a Gemm whose inputs are dequantized but whose bias is float gets an int32 bias (scale = input
      scale x weight scale) behind a DequantizeLinear, so ORT's QDQ selector turns it into QGemm.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node if n.op_type == "Constant" and n.attribute}

    def value(name: str):
        return numpy_helper.to_array(inits[name]) if name in inits else consts.get(name)

    producer = {o: n for n in g.node for o in n.output}
    nodes = []
    for n in g.node:
        del n.metadata_props[:]
        n.doc_string = ""
        if n.op_type == "ReduceMean" and len(n.input) > 1:
            axes = value(n.input[1])
            keep = next((a.i for a in n.attribute if a.name == "keepdims"), 1)
            if axes is not None and keep == 1 and sorted(int(a) % 4 for a in np.ravel(axes)) == [2, 3]:
                nodes.append(helper.make_node("GlobalAveragePool", [n.input[0]], list(n.output), name=n.name + "_gap"))
                continue
        if n.op_type == "Gemm" and len(n.input) == 3 and n.input[2] in inits:
            a, b = producer.get(n.input[0]), producer.get(n.input[1])
            if a is not None and b is not None and a.op_type == b.op_type == "DequantizeLinear":
                sa, sb = value(a.input[1]), value(b.input[1])
                if sa is not None and sb is not None and np.ndim(sa) == 0:
                    scale = (np.float64(sa) * np.asarray(sb, np.float64)).astype(np.float32)
                    bias = numpy_helper.to_array(inits[n.input[2]]).astype(np.float64)
                    q = np.round(bias / scale).astype(np.int32)
                    base = n.name or n.output[0]
                    g.initializer.extend([numpy_helper.from_array(q, base + "_bias_int32"),
                                          numpy_helper.from_array(np.broadcast_to(scale, q.shape).copy(), base + "_bias_scale"),
                                          numpy_helper.from_array(np.zeros_like(q), base + "_bias_zero")])
                    nodes.append(helper.make_node("DequantizeLinear", [base + "_bias_int32", base + "_bias_scale", base + "_bias_zero"],
                                                  [base + "_bias_dq"], axis=0, name=base + "_bias_dq"))
                    n.input[2] = base + "_bias_dq"
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
