"""protege: teacher -> distilled student -> evaluated, exported, verified artifact."""
from .errors import ProtegeError
from .pipeline import distill, evaluate, export_onnx
from .recipe import Recipe, load_recipe, parse_recipe
from .run import Run

__all__ = ["ProtegeError", "Recipe", "Run", "distill", "evaluate", "export_onnx", "load_recipe", "parse_recipe"]
__version__ = "0.1.0"
