"""The fused forward pass and closed-form gradient of the ESS objective.

Everything here runs without autograd, in a fixed number of elementwise passes and reductions
over the (B, T) tensors with two transcendental functions per token (the ESS statistics' exp
and the regulariser's expm1, from which the ratio is recovered): the statistics, the per-token
terms, their row sums and (when a gradient is needed) the gradient with respect to
``logp_new``. :class:`ESSLossFunction` wraps it so autograd's backward is a single
multiplication by the saved gradient.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from ess_po.ess import all_reduce_stats, compute_dtype, stats_from_masked_log_ratio

# Below d = -LINEAR_TAIL the regulariser's exp(-d) is continued by its tangent line, so value
# and gradient stay finite (e^50 ~ 5e21, even summed over 1e9 tokens, fits float32) while the
# gradient keeps pulling logp_new up toward logp_old, growing-and-then-constant, never zero.
LINEAR_TAIL = 50.0
_EXP_TAIL = math.exp(LINEAR_TAIL)
# Log-ratio given to masked tokens in the ESS sums: exp(_PAD - shift) is exactly 0.
_PAD = 1e30

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
    (float64 if ``logp_new`` is float64) whatever the input dtype. The mask is used as a 0/1
    float and garbage is removed arithmetically: on CPU, boolean selects cost several times an
    arithmetic pass.
    """
    cdtype = compute_dtype(logp_new)
    lp = logp_new.detach().to(cdtype)
    lo = logp_old.detach().to(cdtype)
    adv = advantages.detach().to(cdtype)
    maskf = mask.to(cdtype)
    # Fresh (B, T) buffers cost allocator work and page faults that rival the arithmetic on
    # CPU, so the passes below run in place in three of them: d, buf and q (which becomes the
    # gradient).

    # Token counts per sequence only where the objective needs them (sequence-scope ESS,
    # seq-mean aggregation): a total fuses with the first pass when compiled. The sums of the
    # final pass are always per sequence, which fuses with its row-broadcast advantages.
    rowwise = options.per_sequence or options.agg_mode.startswith("seq-mean")
    count_rows = maskf.sum(dim=-1 if rowwise else None)
    dim = -1 if options.per_sequence else None
    count = count_rows if options.per_sequence else count_rows.sum()

    # d = logp_new - logp_old at valid tokens and 0 at masked ones; the ESS statistics use the
    # log ratios with masked tokens pushed to -inf (or -1e30), shifted by their maximum so
    # every exponent is <= 0: stable for any log-ratio magnitude.
    compiling = torch.compiler.is_compiling()
    if compiling:
        # Compiled: selects fuse into the generated loops at no cost.
        valid = mask if mask.dtype == torch.bool else mask != 0
        d = torch.where(valid, lp - lo, 0.0)
        local = stats_from_masked_log_ratio(torch.where(valid, d, float("-inf")), count, dim)
        buf = torch.empty_like(d)
    else:
        # Eager: boolean selects cost several arithmetic passes on CPU, so masking is
        # arithmetic. nan_to_num turns masked garbage (NaN, +-inf) into finite numbers that
        # the 0 of the mask then erases; masked tokens get -1e30 for the maximum.
        d = torch.sub(lp, lo).nan_to_num_().mul_(maskf)
        buf = torch.sub(maskf, 1.0).mul_(_PAD).add_(d)
        local = stats_from_masked_log_ratio(buf, count, dim, overwrite=True, valid=maskf)
    if options.per_sequence:
        stats = local
        log_ess_rows = stats.log_ess()
        log_ess = log_ess_rows.unsqueeze(-1)
    else:
        stats = all_reduce_stats(local, options.process_group) if options.sync else local
        log_ess = stats.log_ess()
        log_ess_rows = log_ess.expand_as(count_rows)
    ess_tok = log_ess.exp()
    one_minus_ess_rows = -torch.expm1(log_ess_rows)

    # Regulariser k3(d) = d + exp(-d) - 1 via expm1 (accurate near d = 0). Below d = -L the
    # exponential continues along its tangent: k3 gains e^L * (-L - d).
    # max(-L - d, 0) is exactly 0 unless d < -L, whatever the summation order.
    tail_excess = torch.neg(d, out=buf).sub_(LINEAR_TAIL).clamp_(min=0.0).sum(dim=-1)
    em = torch.clamp(d, min=-LINEAR_TAIL, out=buf)
    em.neg_().expm1_()  # exp(-d) - 1 = -(d k3 / d d); 0 at masked tokens (d = 0)
    q = torch.add(em, d)
    k3_rows = q.sum(dim=-1) + _EXP_TAIL * tail_excess

    # Ratio w = 1 / (1 + em) = exp(d), reusing the regulariser's exponential. It is exact
    # where it matters: an uncapped token has w < ESS <= 1, i.e. d < 0, where 1 + em >= 1 is
    # well conditioned (below d = -L it reads e^-L ~ 2e-22 instead of e^d). Capped tokens
    # (w > ESS, possibly inf) get weight ESS.
    w = torch.add(em, 1.0, out=q).reciprocal_()
    # Tokens with w > ESS (d is free scratch now); masked tokens have w = 1, counted back out.
    above = torch.sub(w, ess_tok, out=d).relu_().sign_().sum()
    masked_rows = (maskf.shape[-1] if rowwise else maskf.numel()) - count_rows
    capped = above - (masked_rows * (log_ess_rows < 0).to(cdtype)).sum()
    q = w.clamp_(max=ess_tok)  # rho = min(w, ESS)

    q.mul_(adv)
    if rollout_weights is not None:
        q.mul_(rollout_weights.detach().to(cdtype))
    if adv.shape[-1] != 1 or rollout_weights is not None:
        q.nan_to_num_()  # per-token advantages or weights may hold garbage at masked positions
    q.mul_(maskf)  # q = rho * A * c, 0 at masked tokens
    # Padded log-probs may be -inf: drop the 0 * (-inf) at masked tokens (a select fuses
    # when compiled; nansum is the cheaper eager pass).
    if compiling:
        pg_rows = torch.where(valid, q * lp, 0.0).sum(dim=-1)
    else:
        pg_rows = torch.nansum(torch.mul(q, lp, out=d), dim=-1)

    weights = _row_weights(count_rows, options, normalizer)
    policy_loss = -(weights * pg_rows).sum()
    regularizer_loss = (weights * one_minus_ess_rows * k3_rows).sum()
    loss = policy_loss + regularizer_loss

    grad = None
    if need_grad:
        # d/d logp_new of weight * (-rho A c logp_new + (1 - ESS) k3(d)), rho held constant.
        # Both terms are 0 at masked tokens, so no masking pass is needed here.
        grad = q.addcmul_(em, one_minus_ess_rows.unsqueeze(-1)).mul_((-weights).unsqueeze(-1))

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
        ess = ess_min = ess_tok.reshape(())
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
