from .onnx import export_model_onnx, onnx_parity, ort_session

__all__ = ["export_model_onnx", "onnx_parity", "ort_session"]
