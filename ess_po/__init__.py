"""ess-po: the ESS policy loss, a clipping-free, batch-adaptive objective for RL post-training.

Fakoor, Aubry, Stranges, Smola (2026), "Trust the Batch, On- or Off-Policy: Adaptive Policy
Optimization for RL Post-Training"; P3O (Fakoor, Chaudhari, Smola, 2019).
"""

from ess_po.ess import all_reduce_stats, effective_sample_size, ess_stats, step_stats
from ess_po.loss import ess_policy_loss
from ess_po.objective import REGULARIZER_LINEAR_TAIL, ESSTokenLoss, ess_token_loss
from ess_po.types import AggMode, ESSLossOutput, ESSScope, ESSStats

__all__ = [
    "REGULARIZER_LINEAR_TAIL",
    "AggMode",
    "ESSLossOutput",
    "ESSScope",
    "ESSStats",
    "ESSTokenLoss",
    "all_reduce_stats",
    "effective_sample_size",
    "ess_policy_loss",
    "ess_stats",
    "ess_token_loss",
    "step_stats",
]
__version__ = "0.1.0"
