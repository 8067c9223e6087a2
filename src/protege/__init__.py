"""protege: teacher -> distilled student -> evaluated, exported, verified artifact."""
from .errors import ProtegeError
from .compress import prune_, quantize_onnx
from .pipeline import compress, distill, evaluate, export_onnx
from .recipe import PruneConfig, QuantizeConfig, Recipe, load_recipe, parse_recipe
from .run import Run

__all__ = ["ProtegeError", "PruneConfig", "QuantizeConfig", "Recipe", "Run", "compress", "distill", "evaluate", "export_onnx",
           "load_recipe", "parse_recipe", "prune_", "quantize_onnx"]
__version__ = "0.1.0"
