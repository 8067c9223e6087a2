from .metrics import classification_metrics
from .profile import ort_latency, torch_latency
from .report import Report, Stage, format_table, read_report, write_report

__all__ = ["classification_metrics", "format_table", "ort_latency", "read_report", "Report", "Stage",
           "torch_latency", "write_report"]
