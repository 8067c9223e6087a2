"""The names of what protege writes in a run folder (see Run for the layout)."""
from __future__ import annotations

CHECKPOINT_FILES = ("last.safetensors", "last.prev.safetensors", "best.safetensors")
COMPRESS_ARTIFACTS = ("pruned/model.safetensors", "pruned/config.json", "pruned/checkpoints/last.safetensors",
                      "pruned/checkpoints/last.prev.safetensors",
                      "pruned/checkpoints/best.safetensors", "pruned.onnx", "pruned.rejected.onnx", "quantized/static.onnx",
                      "quantized/dynamic.onnx", "quantized/qat.onnx", "quantized/qat.rejected.onnx", "quantized/choice.json",
                      "quantized/qat_checkpoints/last.safetensors", "quantized/qat_checkpoints/last.prev.safetensors",
                      "quantized/qat_checkpoints/best.safetensors", "student.int8.onnx")
ARTIFACTS = ("teacher/model.safetensors", "teacher/config.json", "teacher/checkpoints/last.safetensors",
             "teacher/checkpoints/last.prev.safetensors", "teacher/checkpoints/best.safetensors",
             "student/model.safetensors", "student/config.json", "student/checkpoints/last.safetensors",
             "student/checkpoints/last.prev.safetensors", "student/checkpoints/best.safetensors",
             "student.onnx", "student.rejected.onnx", "report.json", "metrics.jsonl", "report.html", "recipe.yaml",
             "student.budget.onnx",
             *COMPRESS_ARTIFACTS)
MANIFEST = "manifest.json"
LOCK = ".protege.lock"
JOIN = ".protege.join"  # a folder of runs that several processes share (a --seeds run): run/lock.py joined
