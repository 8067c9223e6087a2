from .metrics import classification_metrics
from .profile import ort_latency, torch_latency
from .report import format_table, write_report

__all__ = ["classification_metrics", "format_table", "ort_latency", "torch_latency", "write_report"]
