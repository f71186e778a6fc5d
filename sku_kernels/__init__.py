"""Fused token-level cross-entropy and KL from hidden states and the LM head."""

from .linear_ce_kl import fused_linear_cross_entropy, fused_linear_kl_div, linear_ce_kl

__all__ = ["fused_linear_cross_entropy", "fused_linear_kl_div", "linear_ce_kl"]
