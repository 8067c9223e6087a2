"""protege: teacher -> distilled student -> evaluated, exported, verified artifact."""
from .errors import ProtegeError
from .compress import prune_, quantize_onnx
from .stages import compress, distill, evaluate, export_onnx
from .recipe import PruneConfig, QuantizeConfig, Recipe, load_recipe, parse_recipe
from .run import Run
from .version import __version__
from . import logs

__all__ = ["ProtegeError", "__version__", "logs", "PruneConfig", "QuantizeConfig", "Recipe", "Run", "compress", "distill", "evaluate", "export_onnx",
           "load_recipe", "parse_recipe", "prune_", "quantize_onnx"]
