"""Loss functions (pure, in ``functional``) and the response-term registry used by recipes."""
from . import functional
from .functional import cross_entropy, dkd, kd_kl, mse_logits, mse_prob

__all__ = ["functional", "cross_entropy", "dkd", "kd_kl", "mse_logits", "mse_prob"]
