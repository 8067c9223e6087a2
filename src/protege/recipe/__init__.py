"""The recipe: its typed schema (schema.py) and how recipe files are read, overridden and written (files.py)."""
from .files import apply_overrides, dump_recipe, load_recipe, parse_recipe
from .schema import (
                     DataConfig,
                     CausalLMRecipe,
                     ClassifyRecipe,
                     DistillConfig,
                     EvalConfig,
                     ExportConfig,
                     FeatureTerm,
                     LMDistillConfig,
                     ModelSpec,
                     PruneConfig,
                     QuantizeConfig,
                     Recipe,
                     StudentConfig,
                     TeacherConfig,
                     TrainConfig,
)

__all__ = ["CausalLMRecipe", "ClassifyRecipe", "DataConfig", "DistillConfig", "LMDistillConfig", "EvalConfig", "ExportConfig", "FeatureTerm", "ModelSpec", "PruneConfig",
           "QuantizeConfig", "Recipe", "StudentConfig", "TeacherConfig", "TrainConfig", "apply_overrides", "dump_recipe",
           "load_recipe", "parse_recipe"]
