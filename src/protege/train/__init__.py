"""Training: the Distiller (sum of named loss terms) and the fit loop with checkpoints and resume."""
from .distiller import Distiller, label_loss
from .fit import FitResult, fit

__all__ = ["Distiller", "FitResult", "fit", "label_loss"]
