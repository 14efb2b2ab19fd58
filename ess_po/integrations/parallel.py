r"""Which ranks one ESS is all-reduced over, for every parallel layout.

The ESS of a step is one number over exactly the tokens of that step, the same on every rank
that computes the loss. The core combines the per-rank statistics with one all-reduce
(:func:`ess_po.all_reduce_stats`) over a ``torch.distributed`` group; this module picks that group
(ESS as in Fakoor, Aubry, Stranges, Smola, 2026, "Trust the Batch, On- or Off-Policy").
The rule, for a rank that computes the loss:

* ranks holding **disjoint** tokens of the step (data parallel, context parallel when the loss
  sees the local sequence chunk) **must** join, or each computes the ESS of its share only;
* ranks holding **identical copies** of the same tokens (tensor-parallel replicas, Ulysses or
  context-parallel ranks after an all-gather) **may** join: replicating every token :math:`k`
  times leaves :math:`\mathrm{ESS} = (\sum_t w_t)^2 / (n \sum_t w_t^2)` unchanged, since
  :math:`(k S_1)^2 / (k n \cdot k S_2) = S_1^2 / (n S_2)`. Replication must be uniform: a
  token copied more often than another gets more weight;
* ranks that compute **no loss** (pipeline stages other than the last) must **not** be members:
  a collective they never enter would hang.

Layouts:

* one process, DDP, FSDP, FSDP + Ulysses sequence parallel: the default (world) group. Every
  rank computes the loss; Ulysses ranks hold all-gathered, identical log-probs.
* Megatron-core ``parallel_state`` initialised (TP, PP, CP, DP, EP):
  ``get_data_parallel_group(with_context_parallel=True)``, the DP x CP ranks of this rank's
  pipeline stage and tensor-parallel rank.

For Megatron the data-parallel group *without* context parallelism is wrong when the loss sees
the local chunk of each sequence (Megatron's ``get_batch_on_this_cp_rank`` split): the CP ranks
of a sequence would each weight their chunk with a different ESS. verl 0.9 all-gathers
log-probs over the CP group before its loss, so there the CP ranks hold copies and both groups
give the same ESS; the DP x CP group is right in both cases. Expert parallelism shards experts
inside the DP x CP ranks, not the tokens the loss sees, so it needs no group of its own.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["ess_process_group", "megatron_loss_group"]


def megatron_loss_group() -> Any:
    """Megatron-core's DP x CP group, or ``None`` when its ``parallel_state`` is not initialised.

    Looks ``megatron.core.parallel_state`` up in :data:`sys.modules` only: a process that has not
    imported Megatron does not run it, and importing it here would cost seconds.
    """
    mpu = sys.modules.get("megatron.core.parallel_state")
    if mpu is None or not mpu.model_parallel_is_initialized():
        return None
    return mpu.get_data_parallel_group(with_context_parallel=True)


def ess_process_group(override: Any = None) -> Any:
    """The group to pass as ``process_group`` to :func:`ess_po.ess_policy_loss` (``None``: world).

    Args:
        override: a ``torch.distributed`` group to use as is (for instance the one given to
            ``ess_po.integrations.verl.set_process_group``); ``None`` picks automatically.

    Returns:
        ``override`` if given; else Megatron's DP x CP group when Megatron-core's
        ``parallel_state`` is initialised (:func:`megatron_loss_group`); else ``None``, which the
        core reads as the default (world) group.
    """
    if override is not None:
        return override
    return megatron_loss_group()
