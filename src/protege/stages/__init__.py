"""The stages of a run, written once for every task: distill (data -> teacher -> student), compress (prune, int8),
export (checked ONNX) and evaluate (report). A Task (classify.py, causal_lm.py) supplies what differs."""
from .compress import compress
from .distill import distill
from .evaluate import evaluate
from .export import export_onnx
from .seeds import distill_seeds
from .tune import tune

__all__ = ["compress", "distill", "distill_seeds", "evaluate", "export_onnx", "tune"]
