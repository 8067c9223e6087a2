"""Compression: pruning (unstructured masks, structured channel removal) and int8 in ONNX Runtime."""
from .prune import PruneResult, make_permanent, prune_
from .quantize import quantize_dynamic, quantize_onnx, quantize_static

__all__ = ["PruneResult", "make_permanent", "prune_", "quantize_dynamic", "quantize_onnx", "quantize_static"]
