"""ess-po: the ESS policy loss, a clipping-free, batch-adaptive objective for RL post-training.

Fakoor, Aubry, Stranges, Smola (2026), "Trust the Batch, On- or Off-Policy: Adaptive Policy
Optimization for RL Post-Training"; P3O (Fakoor, Chaudhari, Smola, 2019).
"""

from ess_po.ess import ESSStats, all_reduce_stats, effective_sample_size, ess_stats
from ess_po.loss import AggMode, ESSLossOutput, ESSScope, ess_policy_loss

__all__ = [
    "AggMode",
    "ESSLossOutput",
    "ESSScope",
    "ESSStats",
    "all_reduce_stats",
    "effective_sample_size",
    "ess_policy_loss",
    "ess_stats",
]
__version__ = "0.1.0"
