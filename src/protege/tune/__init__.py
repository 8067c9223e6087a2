"""Tuning: the recipe's ``tune`` section (search space, trials); `protege tune` itself is stages/tune.py."""
from .space import Range, TuneConfig, default_space

__all__ = ["Range", "TuneConfig", "default_space"]
