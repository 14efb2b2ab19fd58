"""The fused forward pass and closed-form gradient of the ESS objective.

Everything here runs without autograd: one pass gathers the ESS statistics, one elementwise pass
produces the per-token terms, their row sums and (when a gradient is needed) the gradient with
respect to ``logp_new``. :class:`ESSLossFunction` wraps it so autograd's backward is a single
multiplication by the saved gradient.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from ess_po.ess import all_reduce_stats, stats_from_masked_log_ratio

# Below d = -LINEAR_TAIL the regulariser's exp(-d) is continued by its tangent line, so value
# and gradient stay finite (e^30 ~ 1e13 even summed over 1e9 tokens fits float32) while the
# gradient keeps pulling logp_new up toward logp_old, growing-and-then-constant, never zero.
LINEAR_TAIL = 30.0
_EXP_TAIL = math.exp(LINEAR_TAIL)

# Order of the packed diagnostics returned next to the loss.
DIAGNOSTICS = (
    "ess",
    "ess_min",
    "capped_frac",
    "kl_behavior",
    "ratio_mean",
    "ratio_max",
    "policy_loss",
    "regularizer_loss",
    "num_tokens",
)


class LossOptions(NamedTuple):
    agg_mode: str
    per_sequence: bool
    process_group: dist.ProcessGroup | None
    sync: bool


def _row_weights(
    count_rows: torch.Tensor, options: LossOptions, normalizer: torch.Tensor | None
) -> torch.Tensor:
    """Per-sequence aggregation weights: loss = sum_b weight_b * sum_t token_loss_bt."""
    one = torch.ones((), dtype=count_rows.dtype, device=count_rows.device)
    mode = options.agg_mode
    if mode == "token-sum":
        return one.expand_as(count_rows)
    if mode == "token-mean":
        denom = count_rows.sum().clamp(min=1.0) if normalizer is None else normalizer
        return (one / denom).expand_as(count_rows)
    # seq-mean-*: fully masked sequences are not counted, as in verl's agg_loss.
    if normalizer is None:
        denom = (count_rows > 0).sum().to(count_rows.dtype).clamp(min=1.0)
    else:
        denom = normalizer
    if mode == "seq-mean-token-sum":
        return (one / denom).expand_as(count_rows)
    return 1.0 / (count_rows.clamp(min=1.0) * denom)  # seq-mean-token-mean


def ess_loss_forward(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    rollout_weights: torch.Tensor | None,
    normalizer: torch.Tensor | None,
    options: LossOptions,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Loss, packed diagnostics (see ``DIAGNOSTICS``) and d loss / d logp_new (or ``None``).

    Inputs are already validated; advantages are (B, 1) or (B, T). Computation is float32
    (float64 if ``logp_new`` is float64) whatever the input dtype.
    """
    cdtype = torch.float64 if logp_new.dtype == torch.float64 else torch.float32
    lp = logp_new.detach().to(cdtype)
    lo = logp_old.detach().to(cdtype)
    adv = advantages.detach().to(cdtype)
    valid = mask if mask.dtype == torch.bool else mask != 0

    # d = logp_new - logp_old at valid tokens, 0 elsewhere: masked garbage (-inf, NaN) never
    # reaches an exp, and k3(0) = 0 so padding adds nothing to any sum.
    d = torch.where(valid, lp - lo, 0.0)
    lw = torch.where(valid, d, float("-inf"))
    count_rows = valid.sum(dim=-1).to(cdtype)

    # ESS statistics with a max shift (exponents <= 0): stable for any log-ratio magnitude.
    if options.per_sequence:
        local = stats = stats_from_masked_log_ratio(lw, count_rows, dim=-1)
        log_ess_rows = stats.log_ess()
        log_ess = log_ess_rows.unsqueeze(-1)
    else:
        local = stats_from_masked_log_ratio(lw, count_rows.sum(), dim=None)
        stats = all_reduce_stats(local, options.process_group) if options.sync else local
        log_ess = stats.log_ess()
        log_ess_rows = log_ess.expand_as(count_rows)
    one_minus_ess_rows = -torch.expm1(log_ess_rows)

    # Capped score-function weight rho = min(w, ESS), formed in log space.
    rho = torch.exp(torch.minimum(d, log_ess))
    capped = (lw > log_ess).sum()

    # Regulariser k3(d) = d + exp(-d) - 1 via expm1 (accurate near d = 0), with a linear tail.
    tail = d.clamp(min=-LINEAR_TAIL)
    em = torch.expm1(-tail)  # exp(-d) - 1, and -(d k3 / d d)
    k3 = em + d
    k3_rows = k3.sum(dim=-1) + _EXP_TAIL * (tail.sum(dim=-1) - d.sum(dim=-1))

    q = rho * adv
    if rollout_weights is not None:
        q = q * rollout_weights.detach().to(cdtype)
    pg_rows = torch.where(valid, q * lp, 0.0).sum(dim=-1)

    weights = _row_weights(count_rows, options, normalizer)
    policy_loss = -(weights * pg_rows).sum()
    regularizer_loss = (weights * one_minus_ess_rows * k3_rows).sum()
    loss = policy_loss + regularizer_loss

    grad = None
    if need_grad:
        # d/d logp_new of weight * (-rho A c logp_new + (1 - ESS) k3(d)), rho held constant.
        g = torch.addcmul(q, em, one_minus_ess_rows.unsqueeze(-1))
        g = g * (-weights).unsqueeze(-1)
        grad = torch.where(valid, g, 0.0)

    n_local = local.count.sum() if options.per_sequence else local.count
    n_safe = n_local.clamp(min=1.0)
    has_tokens = n_local > 0
    if options.per_sequence:
        nonempty = count_rows > 0
        ess_rows = log_ess_rows.exp()
        n_seq = nonempty.sum().clamp(min=1)
        ess = torch.where(nonempty, ess_rows, 0.0).sum() / n_seq
        ess = torch.where(nonempty.any(), ess, 1.0)
        ess_min = torch.where(nonempty, ess_rows, 1.0).amin()
        log_sum_w = torch.logsumexp(local.log_sum_w, dim=0)
        ratio_max = torch.exp(torch.where(nonempty, local.shift, float("-inf")).amax())
    else:
        ess = ess_min = stats.ess()
        log_sum_w = local.log_sum_w
        ratio_max = torch.exp(local.shift)
    ratio_mean = torch.where(has_tokens, torch.exp(log_sum_w - torch.log(n_safe)), 1.0)
    ratio_max = torch.where(has_tokens, ratio_max, 1.0)
    # Ratios beyond float32's range (log ratio > 88) are reported saturated, not as inf.
    fmax = torch.finfo(torch.float32).max
    ratio_mean, ratio_max = ratio_mean.clamp(max=fmax), ratio_max.clamp(max=fmax)
    diagnostics = torch.stack(
        [
            ess,
            ess_min,
            capped.to(cdtype) / n_safe,
            k3_rows.sum() / n_safe,
            ratio_mean,
            ratio_max,
            policy_loss,
            regularizer_loss,
            n_local,
        ]
    ).to(torch.float32)
    return loss, diagnostics, grad


class ESSLossFunction(torch.autograd.Function):
    """Autograd wrapper: forward = :func:`ess_loss_forward`, backward = grad_out * saved grad."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        logp_new: torch.Tensor,
        logp_old: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        rollout_weights: torch.Tensor | None,
        normalizer: torch.Tensor | None,
        options: LossOptions,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        need_grad = bool(ctx.needs_input_grad[0])  # type: ignore[attr-defined]
        loss, diagnostics, grad = ess_loss_forward(
            logp_new, logp_old, advantages, mask, rollout_weights, normalizer, options, need_grad
        )
        ctx.mark_non_differentiable(diagnostics)
        if grad is not None:
            ctx.save_for_backward(grad)
        ctx.input_dtype = logp_new.dtype  # type: ignore[attr-defined]
        return loss, diagnostics

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor, _grad_diag: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors  # type: ignore[attr-defined]
        out = grad * grad_loss.to(grad.dtype)
        dtype: torch.dtype = ctx.input_dtype  # type: ignore[attr-defined]
        if dtype != out.dtype:
            # Narrow dtypes: saturate instead of overflowing to inf (fp16 tops out at 65504).
            limit = torch.finfo(dtype).max
            out = out.clamp(-limit, limit).to(dtype)
        return out, None, None, None, None, None, None
