"""protege: teacher -> distilled student -> evaluated, exported, verified artifact."""
from . import logs
from .compress import prune_, quantize_onnx
from .errors import ProtegeError
from .evaluate import Report
from .recipe import PruneConfig, QuantizeConfig, Recipe, load_recipe, parse_recipe
from .run import Run
from .stages import compress, distill, distill_seeds, evaluate, export_onnx
from .version import __version__

__all__ = ["ProtegeError", "Report", "__version__", "logs", "PruneConfig", "QuantizeConfig", "Recipe", "Run", "compress", "distill", "distill_seeds", "evaluate", "export_onnx",
           "load_recipe", "parse_recipe", "prune_", "quantize_onnx"]
