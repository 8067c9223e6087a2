"""Models: the zoo, user modules (``file.py:factory``), safetensors weights and ONNX files."""
from .loading import OnnxModule, build_model, load_weights, num_params, save_weights
from .zoo import ZOO, count_params

__all__ = ["ZOO", "OnnxModule", "build_model", "count_params", "load_weights", "num_params", "save_weights"]
