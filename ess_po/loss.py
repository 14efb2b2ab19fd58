r"""The ESS policy loss: a clipping-free, batch-adaptive policy objective.

Fakoor, Aubry, Stranges, Smola (2026), "Trust the Batch, On- or Off-Policy: Adaptive Policy
Optimization for RL Post-Training"; the LLM form of P3O (Fakoor, Chaudhari, Smola, 2019).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ess_po._validation import check_choice, check_normalizer, check_normalizer_value, check_tensor
from ess_po.aggregation import aggregate
from ess_po.objective import checked_token_terms
from ess_po.types import AGG_MODES, AggMode, ESSLossOutput, ESSScope, ESSStats


def ess_policy_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_agg_mode: AggMode = "token-mean",
    normalizer: float | torch.Tensor | None = None,
    ess_scope: ESSScope | None = None,
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

    Numerics: float32 inside (float64 if any input is float64), whatever the input dtypes and
    any ambient ``torch.autocast``; the gradient comes back in ``logp_new``'s dtype (an fp16
    overflow is inf). Masked positions never reach the loss or the gradient; a NaN or inf at a
    valid position shows in the loss. Eager and ``torch.compile`` share one semantics, and
    nothing synchronises with the device unless ``check_values`` is set.

    Args:
        logp_new: ``(B, T)`` log-probabilities of the sampled tokens under the current policy.
        logp_old: ``(B, T)`` log-probabilities under the behaviour (rollout) policy; any
            floating dtype.
        advantages: ``(B,)``, ``(B, 1)`` or ``(B, T)``.
        mask: ``(B, T)`` bool or 0/1: which tokens count. Masked positions may hold anything
            (``-inf``, NaN) in the other inputs; they never reach the loss or the gradient.
        loss_agg_mode: ``"token-mean"`` (mean over all valid tokens), ``"seq-mean-token-mean"``,
            ``"seq-mean-token-sum"`` or ``"token-sum"``.
        normalizer: the denominator of the mean for the whole optimizer batch (valid tokens for
            token-mean, sequences for seq-mean-*, summed over micro-batches and ranks; under
            DDP/FSDP, which average gradients, divide it by the world size). ``None``: this
            call's own count. A finite positive number or a one-element tensor (on the inputs'
            device or the CPU). Not used with token-sum.
        ess_scope: the tokens one ESS is computed over (:data:`ess_po.ESSScope`): ``"call"``
            (this call's valid tokens, all ranks), ``"step"`` (the statistics in ``stats``) or
            ``"sequence"`` (one ESS per row). ``None``: ``"step"`` if ``stats`` is given,
            else ``"call"``. The old name ``"batch"`` warns.
        rollout_weights: optional ``(B, T)`` weights :math:`c_t` multiplying the policy term
            (rollout-correction importance weights, as verl and TRL pass them).
        process_group: group for the ESS all-reduce; ``None`` is the default group.
        sync_ess: in ``"call"`` scope with several ranks, compute the ESS over the valid tokens
            of all ranks (one all-reduce); every rank must then call the loss, also a rank with
            an empty shard.
        stats: precomputed 0-dim :class:`ESSStats`, e.g. of the whole optimizer step from
            :func:`step_stats`: the ESS comes from them, with no all-reduce here.
        check_values: also check that valid positions are finite, that the mask is 0/1, and
            that ``stats`` and a tensor ``normalizer`` are finite with positive counts. These
            checks synchronise with the device, so they are off by default.

    Returns:
        :class:`ESSLossOutput`: the scalar ``loss`` and detached diagnostics.

    Raises:
        TypeError: an input is not a tensor.
        ValueError: shape, dtype or device mismatches, unknown options, a bad ``normalizer``,
            ``stats`` that do not fit the scope, and (with ``check_values``) non-finite values
            at valid positions or a non-binary mask.

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
    # The token modes need only the sums over the tokens, divided inside the loss's one
    # autograd node (no (B, T) products, no second pass over a float mask); the seq-mean modes
    # need the per-token terms and count per row.
    token_mode = not loss_agg_mode.startswith("seq-mean")
    divisor = None  # token-sum: not divided
    if loss_agg_mode == "token-mean":
        divisor = "count" if normalizer is None else normalizer
    tok = checked_token_terms(
        logp_new, logp_old, advantages, mask, ess_scope, rollout_weights, process_group,
        sync_ess, stats, check_values, sums=token_mode, divisor=divisor,
    )  # fmt: skip
    if token_mode:
        pol, reg = tok.policy_loss, tok.regularizer_loss
        if not (pol.requires_grad or reg.requires_grad) and pol.dtype == torch.float32:
            return tok  # already detached float32 (the fused path's non-differentiable parts)
        return tok._replace(
            policy_loss=_detached_float(tok.policy_loss),
            regularizer_loss=_detached_float(tok.regularizer_loss),
        )
    valid = mask if mask.dtype == torch.bool else mask != 0
    policy_loss = aggregate(tok.policy_loss, valid, loss_agg_mode, normalizer)
    regularizer_loss = aggregate(tok.regularizer_loss, valid, loss_agg_mode, normalizer)
    return tok._replace(
        loss=policy_loss + regularizer_loss,
        policy_loss=_detached_float(policy_loss),
        regularizer_loss=_detached_float(regularizer_loss),
    )


def _detached_float(x: torch.Tensor) -> torch.Tensor:
    x = x.detach()
    return x if x.dtype == torch.float32 else x.float()
