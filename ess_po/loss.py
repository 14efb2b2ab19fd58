r"""The ESS policy loss: a clipping-free, batch-adaptive policy objective.

Fakoor, Aubry, Stranges, Smola (2026), "Trust the Batch, On- or Off-Policy: Adaptive Policy
Optimization for RL Post-Training"; the LLM form of P3O (Fakoor, Chaudhari, Smola, 2019).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.distributed as dist

from ess_po._validation import (
    AGG_MODES,
    check_choice,
    check_normalizer,
    check_normalizer_value,
    check_tensor,
)
from ess_po.aggregation import aggregate
from ess_po.ess import ESSStats
from ess_po.objective import ess_token_loss

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum"]
"""How :func:`ess_policy_loss` aggregates the ``(B, T)`` per-token losses into a scalar.

``"token-mean"``: sum over valid tokens / number of valid tokens (or ``normalizer``);
``"seq-mean-token-mean"``: mean over sequences of each sequence's token mean;
``"seq-mean-token-sum"``: mean over sequences of each sequence's token sum;
``"token-sum"``: plain sum. Fully masked sequences are not counted by the seq-mean modes.
"""
ESSScope = Literal["batch", "sequence"]
"""Over which tokens the ESS (and with it the cap and the regulariser weight) is computed.

``"batch"``: one ESS over all valid tokens of the ``(B, T)`` call, all-reduced over
data-parallel ranks, as the authors' reference implementation does; with ``stats=`` one ESS
over precomputed statistics, e.g. of the whole optimizer step (:func:`step_stats`).
``"sequence"``: one ESS per row, shape ``(B,)``.
"""


class ESSLossOutput(NamedTuple):
    """The loss and its diagnostics. All fields but ``loss`` are detached 0-dim float32 tensors.

    New fields are appended at the end, so positional unpacking of the older ones keeps working.

    Attributes:
        loss: scalar objective to minimise (float32; float64 for float64 inputs).
        ess: normalized effective sample size (batch scope: over all valid tokens of all ranks;
            sequence scope: mean over non-empty sequences of this call).
        ess_min: smallest per-sequence ESS (equals ``ess`` in batch scope).
        capped_frac: fraction of valid tokens whose ratio exceeded ESS (weight capped to ESS).
            Near on-policy it can read 0.3-0.5 while the cap changes nothing: ratios a rounding
            step above ESS count; ``capped_mass`` tells how much the cap actually removes.
        kl_behavior: mean over valid tokens of k3 = d + exp(-d) - 1 (with the linear tail below
            -REGULARIZER_LINEAR_TAIL), the regulariser's divergence estimate between the current
            and the behaviour policy.
        ratio_mean: mean ratio w over valid tokens.
        ratio_max: largest ratio w over valid tokens (saturates at float32's largest number).
        policy_loss: the aggregated policy term (part of ``loss``).
        regularizer_loss: the aggregated (1 - ESS) * k3 term (part of ``loss``).
        num_tokens: number of valid tokens in this call.
        capped_mass: share of the ratio mass the cap removes, sum(w - rho) / sum(w) over valid
            tokens: 0 on-policy, about 0 when ratios exceed ESS only by rounding, toward 1 when
            one ratio dominates. Computed in log space (no overflow for huge ratios).
        ratio_min: smallest ratio w over valid tokens: how far into the regulariser's tail the
            batch reaches (below exp(-REGULARIZER_LINEAR_TAIL) the tail is linear).

    Diagnostics other than ``ess`` are local to the call; frameworks average them across ranks
    when they log, as they do with clip fractions.
    """

    loss: torch.Tensor
    ess: torch.Tensor
    ess_min: torch.Tensor
    capped_frac: torch.Tensor
    kl_behavior: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_max: torch.Tensor
    policy_loss: torch.Tensor
    regularizer_loss: torch.Tensor
    num_tokens: torch.Tensor
    capped_mass: torch.Tensor
    ratio_min: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor]:
        """The diagnostics (every field except ``loss`` and ``num_tokens``) as a dict of tensors.

        No host synchronisation: convert to floats once, where the framework logs.
        """
        return {name: getattr(self, name) for name in self._fields[1:] if name != "num_tokens"}


def ess_policy_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_agg_mode: AggMode = "token-mean",
    normalizer: float | torch.Tensor | None = None,
    ess_scope: ESSScope = "batch",
    rollout_weights: torch.Tensor | None = None,
    process_group: dist.ProcessGroup | None = None,
    sync_ess: bool = True,
    stats: ESSStats | None = None,
    check_values: bool = False,
) -> ESSLossOutput:
    r"""The ESS policy loss with its diagnostics.

    For valid tokens :math:`t` (``mask = 1``) with :math:`d_t = \log\pi_\theta - \log\pi_{old}`
    and ratio :math:`w_t = e^{d_t}`:

    .. math::

        \mathrm{ESS} &= \frac{(\sum_t w_t)^2}{n \sum_t w_t^2} \in [1/n, 1]
            \quad\text{(no gradient)} \\
        \rho_t &= \mathrm{sg}\big(\min(w_t, \mathrm{ESS})\big) \\
        \ell_t &= -\rho_t\, c_t\, A_t \log\pi_\theta(t)
            + (1 - \mathrm{ESS})\,k_3(d_t), \qquad k_3(d) = d + e^{-d} - 1

    aggregated by ``loss_agg_mode``. On-policy (``logp_old == logp_new``) ESS = 1 and the loss is
    REINFORCE with the given advantages; as the batch goes stale ESS falls, the cap on the
    score-function weight tightens and the k3 regulariser pulling the policy back toward the
    behaviour policy turns on. The objective has no hyper-parameters. Gradients flow to
    ``logp_new`` only; behaviour log-probabilities, advantages and weights are constants
    (detached if they require grad). ESS and :math:`\rho` carry no gradient, so second
    derivatives are those of the regulariser, :math:`(1-\mathrm{ESS})\,e^{-d_t}`.

    The regulariser's tail: below :math:`d = -L`, ``L = REGULARIZER_LINEAR_TAIL`` (50), :math:`k_3`
    is continued by its tangent line, :math:`k_3(-L) + (1 - e^{L})(d + L)`, so value and
    gradient stay finite. Between :math:`d \approx -10` and :math:`-L` the gradient
    :math:`1 - e^{-d}` grows exponentially: one token there can outweigh the batch (watch
    ``ratio_min``).

    Numerics: computed in float32 (float64 if any input is float64) whatever the input dtypes
    (bf16 ``logp_new`` beside fp32 ``logp_old`` is fine) and whatever ``torch.autocast`` is
    active; the gradient is returned in ``logp_new``'s dtype by autograd's own cast, so an fp16
    overflow becomes inf (a GradScaler then skips the step). Masked positions never reach the
    loss or the gradient, whatever they hold; a NaN or inf at a valid position shows in the
    loss. The same code runs eager and under ``torch.compile``, and it never synchronises with
    the device (no ``.item()``, no host-to-device copy) unless ``check_values`` is set.

    Args:
        logp_new: ``(B, T)`` log-probabilities of the sampled tokens under the current policy.
        logp_old: ``(B, T)`` log-probabilities under the behaviour (rollout) policy; any
            floating dtype.
        advantages: ``(B,)``, ``(B, 1)`` or ``(B, T)``.
        mask: ``(B, T)`` bool or 0/1: which tokens count. Masked positions may hold anything
            (``-inf``, NaN) in the other inputs; they never reach the loss or the gradient.
        loss_agg_mode: ``"token-mean"`` (mean over all valid tokens), ``"seq-mean-token-mean"``,
            ``"seq-mean-token-sum"`` or ``"token-sum"``.
        normalizer: the denominator of the mean for the whole optimizer batch: its number of
            valid tokens (token-mean) or of sequences (seq-mean-*), summed over
            gradient-accumulation micro-batches and data-parallel ranks. With it, the losses of
            the pieces add up to the loss of the whole batch. Under DDP/FSDP, which *average*
            gradients over ranks, pass the global count divided by the world size (or multiply
            the loss by it, as verl does). ``None``: this call's own count (valid tokens;
            non-empty sequences). A finite positive Python number (numpy scalars too) or a
            one-element tensor (on the inputs' device, or on the CPU). Not used with token-sum.
        ess_scope: ``"batch"`` (one ESS over all valid tokens, and all ranks) or ``"sequence"``
            (each sequence its own ESS, cap and regulariser weight).
        rollout_weights: optional ``(B, T)`` weights :math:`c_t` multiplying the policy term
            (rollout-correction importance weights, as verl and TRL pass them).
        process_group: group for the ESS all-reduce; ``None`` is the default group.
        sync_ess: in batch scope, when torch.distributed is initialised with several ranks,
            compute ESS over the valid tokens of all ranks (one all-reduce of three numbers).
            Every rank must then call the loss the same number of times, also a rank whose
            shard is empty (``B = 0`` or all masked).
        stats: precomputed batch statistics (0-dim :class:`ESSStats`), e.g. of the whole
            optimizer step from :func:`step_stats` (all micro-batches, all ranks): the ESS is
            computed from them instead of from this call's tokens, and no all-reduce happens
            here. Batch scope only. Diagnostics other than ``ess`` stay local to the call.
        check_values: also check that valid positions are finite, that the mask is 0/1, and
            that ``stats`` and a tensor ``normalizer`` are finite with positive counts. These
            checks synchronise with the device, so they are off by default.

    Returns:
        :class:`ESSLossOutput`: the scalar ``loss`` and detached diagnostics.

    Raises:
        TypeError: an input is not a tensor.
        ValueError: on shape, dtype or device mismatches, unknown options, a non-finite or
            non-positive number as ``normalizer``, ``stats`` that are not 0-dim
            :class:`ESSStats` on the inputs' device or used with sequence scope, and (with
            ``check_values``) non-finite values at valid positions or a non-binary mask.

    Example:
        >>> import torch
        >>> from ess_po import ess_policy_loss
        >>> logp_new = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
        >>> logp_old = torch.tensor([[-1.2, -1.5, -0.5]])
        >>> out = ess_policy_loss(logp_new, logp_old, torch.tensor([1.0]), torch.ones(1, 3))
        >>> out.loss.backward()
        >>> round(out.ess.item(), 4), round(out.capped_frac.item(), 4)
        (0.9322, 0.6667)
        >>> logp_new.grad
        tensor([[-0.3066, -0.2168, -0.3107]])
    """
    check_choice("loss_agg_mode", loss_agg_mode, AGG_MODES)
    check_tensor("logp_new", logp_new)
    normalizer = check_normalizer(normalizer, loss_agg_mode, logp_new.device)
    if check_values:
        check_normalizer_value(normalizer)
    tok = ess_token_loss(
        logp_new,
        logp_old,
        advantages,
        mask,
        ess_scope=ess_scope,
        rollout_weights=rollout_weights,
        process_group=process_group,
        sync_ess=sync_ess,
        stats=stats,
        check_values=check_values,
    )
    valid = mask if mask.dtype == torch.bool else mask != 0
    policy_loss = aggregate(tok.policy_loss, valid, loss_agg_mode, normalizer)
    regularizer_loss = aggregate(tok.regularizer_loss, valid, loss_agg_mode, normalizer)
    return ESSLossOutput(
        policy_loss + regularizer_loss,
        tok.ess,
        tok.ess_min,
        tok.capped_frac,
        tok.kl_behavior,
        tok.ratio_mean,
        tok.ratio_max,
        policy_loss.detach().float(),
        regularizer_loss.detach().float(),
        tok.num_tokens,
        tok.capped_mass,
        tok.ratio_min,
    )
