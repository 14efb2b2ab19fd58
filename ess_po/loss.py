r"""The ESS policy loss: a clipping-free, batch-adaptive policy objective.

Fakoor, Aubry, Stranges, Smola (2026), "Trust the Batch, On- or Off-Policy: Adaptive Policy
Optimization for RL Post-Training"; the LLM form of P3O (Fakoor, Chaudhari, Smola, 2019).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.distributed as dist

from ess_po._kernel import DIAGNOSTICS, ESSLossFunction, LossOptions
from ess_po._validation import (
    AGG_MODES,
    ESS_SCOPES,
    check_choice,
    check_loss_inputs,
    check_loss_values,
)
from ess_po.ess import compute_dtype

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
data-parallel ranks (the paper). ``"sequence"``: one ESS per row, shape ``(B,)``.
"""


class ESSLossOutput(NamedTuple):
    """The loss and its diagnostics. All fields but ``loss`` are detached 0-dim float32 tensors.

    Attributes:
        loss: scalar objective to minimise (float32; float64 for float64 inputs).
        ess: normalized effective sample size (batch scope: over all valid tokens of all ranks;
            sequence scope: mean over non-empty sequences of this call).
        ess_min: smallest per-sequence ESS (equals ``ess`` in batch scope).
        capped_frac: fraction of valid tokens whose ratio exceeded ESS (weight capped to ESS).
        kl_behavior: mean over valid tokens of k3 = d + exp(-d) - 1, the regulariser's divergence
            estimate between the current and the behaviour policy.
        ratio_mean: mean ratio w over valid tokens.
        ratio_max: largest ratio w over valid tokens.
        policy_loss: the aggregated policy term (part of ``loss``).
        regularizer_loss: the aggregated (1 - ESS) * k3 term (part of ``loss``).
        num_tokens: number of valid tokens in this call.

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

    def metrics(self) -> dict[str, torch.Tensor]:
        """The diagnostics (every field except ``loss`` and ``num_tokens``) as a dict of tensors.

        No host synchronisation: convert to floats once, where the framework logs.
        """
        return {name: getattr(self, name) for name in DIAGNOSTICS if name != "num_tokens"}


def _normalizer_tensor(
    normalizer: float | torch.Tensor, loss_agg_mode: str, like: torch.Tensor
) -> torch.Tensor:
    if loss_agg_mode == "token-sum":
        raise ValueError("normalizer is not used with loss_agg_mode='token-sum'; drop it.")
    dtype = compute_dtype(like)
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(
                f"normalizer must be a number or a one-element tensor, got shape "
                f"{tuple(normalizer.shape)}."
            )
        return normalizer.detach().reshape(()).to(device=like.device, dtype=dtype)
    if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)) or normalizer <= 0:
        raise ValueError(
            f"normalizer must be a positive number (tokens or sequences in the optimizer batch), "
            f"got {normalizer!r}."
        )
    return torch.tensor(float(normalizer), device=like.device, dtype=dtype)


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
            + (1 - \mathrm{ESS})\,\big(d_t + e^{-d_t} - 1\big)

    aggregated by ``loss_agg_mode``. On-policy (``logp_old == logp_new``) ESS = 1 and the loss is
    REINFORCE with the given advantages; as the batch goes stale ESS falls, the cap on the
    score-function weight tightens and the k3 regulariser pulling the policy back toward the
    behaviour policy turns on. The objective has no hyper-parameters. Gradients flow to
    ``logp_new`` only; behaviour log-probabilities, advantages and weights are constants.

    Args:
        logp_new: ``(B, T)`` log-probabilities of the sampled tokens under the current policy.
        logp_old: ``(B, T)`` log-probabilities under the behaviour (rollout) policy; same dtype.
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
            non-empty sequences). Not used with token-sum.
        ess_scope: ``"batch"`` (one ESS over all valid tokens, and all ranks) or ``"sequence"``
            (each sequence its own ESS, cap and regulariser weight).
        rollout_weights: optional ``(B, T)`` weights :math:`c_t` multiplying the policy term
            (rollout-correction importance weights, as verl and TRL pass them).
        process_group: group for the ESS all-reduce; ``None`` is the default group.
        sync_ess: in batch scope, when torch.distributed is initialised with several ranks,
            compute ESS over the valid tokens of all ranks (one all-reduce of three numbers).
            Every rank must then call the loss the same number of times.
        check_values: also check that valid positions are finite and that the mask is 0/1.
            These checks synchronise with the device, so they are off by default.

    Returns:
        :class:`ESSLossOutput`: the scalar ``loss`` and detached diagnostics.

    Raises:
        ValueError: on shape, dtype or device mismatches, unknown options, and (with
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
    check_choice("ess_scope", ess_scope, ESS_SCOPES)
    check_loss_inputs(logp_new, logp_old, advantages, mask, rollout_weights)
    if normalizer is not None:
        normalizer = _normalizer_tensor(normalizer, loss_agg_mode, logp_new)
    if check_values:
        check_loss_values(logp_new, logp_old, advantages, mask, rollout_weights)
        if isinstance(normalizer, torch.Tensor) and not bool(normalizer > 0):
            raise ValueError(f"normalizer must be positive, got {normalizer}.")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    options = LossOptions(loss_agg_mode, ess_scope == "sequence", process_group, sync_ess)
    loss, diag = ESSLossFunction.apply(
        logp_new, logp_old, advantages, mask, rollout_weights, normalizer, options
    )
    return ESSLossOutput(loss, *diag.unbind(0))
