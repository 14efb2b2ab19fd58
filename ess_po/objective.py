r"""The per-token ESS objective: a ``(B, T)`` loss with the batch ESS held constant.

For valid tokens :math:`t` with :math:`d_t = \log\pi_\theta(t) - \log\pi_{old}(t)` and ratio
:math:`w_t = e^{d_t}`:

.. math::

    \ell_t = -\rho_t\, c_t\, A_t \log\pi_\theta(t) + (1 - \mathrm{ESS})\, k_3(d_t),
    \qquad \rho_t = \mathrm{sg}\big(\min(w_t, \mathrm{ESS})\big)

with :math:`k_3(d) = d + e^{-d} - 1`, continued linearly below :math:`d = -L`
(:data:`REGULARIZER_LINEAR_TAIL`). Written with plain torch operations and ordinary autograd,
the same in eager mode and under ``torch.compile``: every input is first replaced by 0 at
masked positions (``torch.where``), so padding, whatever it holds, reaches neither the loss nor
the gradient, while a NaN or inf at a valid position propagates to the loss value.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ess_po import _fused
from ess_po._validation import (
    check_loss_inputs,
    check_loss_values,
    check_stats,
    resolve_scope,
)
from ess_po.aggregation import normalize
from ess_po.ess import all_reduce_stats, autocast_off, compute_dtype, masked_stats, reduce_nonempty
from ess_po.types import ESSLossOutput, ESSScope, ESSStats

#: Below ``d = -REGULARIZER_LINEAR_TAIL`` the regulariser :math:`k_3(d) = d + e^{-d} - 1` is
#: continued by its tangent line, so value and gradient stay finite and the gradient keeps
#: pulling ``logp_new`` back up toward ``logp_old`` (magnitude :math:`e^{-d} - 1` growing down to
#: the threshold, then constant, never zero). 50 keeps :math:`e^{50} \approx 5 \cdot 10^{21}`
#: finite in float32, summed over 10^9 tokens. Between about -10 and -50 one token's gradient can
#: exceed the median token's by orders of magnitude; the value is under study.
REGULARIZER_LINEAR_TAIL: float = 50.0

ESSTokenLoss = ESSLossOutput
"""The result type of :func:`ess_token_loss`: :class:`ESSLossOutput` with ``(B, T)`` loss terms
(kept as a name for older imports)."""


def k3(d: torch.Tensor) -> torch.Tensor:
    r""":math:`k_3(d) = d + e^{-d} - 1`, continued by its tangent line below
    :math:`d = -L` (:data:`REGULARIZER_LINEAR_TAIL`).

    Both pieces are masked by ``clamp``/``relu``, whose backward passes exact zeros: no
    :math:`e^{L}` term is added and subtracted again (that would erase the ordinary gradient).
    Each piece is finite where the other is infinite, so :math:`k_3(\pm\infty) = +\infty`.
    """
    tail = REGULARIZER_LINEAR_TAIL
    dc = torch.clamp(d, min=-tail)
    head = dc + torch.expm1(-dc)  # expm1: accurate near d = 0
    return head + math.expm1(tail) * torch.relu(-tail - d)


def _combine_shifted(stats: ESSStats, shifted: torch.Tensor) -> torch.Tensor:
    """``sum_g exp(shift_g) * shifted_g / sum_g exp(shift_g) * s1_g`` over the groups of
    ``stats`` (one in batch scope, the rows in sequence scope) without leaving log space."""
    nonempty = stats.count > 0
    top = reduce_nonempty(torch.where(nonempty, stats.shift, float("-inf")), "amax", None, 0.0)
    scale = torch.where(nonempty, torch.exp(stats.shift - top), 0.0)
    num = (scale * shifted).sum()
    den = (scale * torch.exp(stats.log_s1)).sum()
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny), 0.0)


# --- dispatch: the fused implementation (issue 24) or the plain-autograd reference -------------


def _token_terms(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    per_sequence: bool,
    rollout_weights: torch.Tensor | None,
    process_group: dist.ProcessGroup | None,
    sync_ess: bool,
    stats: ESSStats | None,
    sums: bool = False,
    divisor: _fused.Divisor | str = None,
) -> ESSLossOutput:
    """The per-token terms (``(B, T)``), or with ``sums`` their 0-dim sums over the tokens
    divided by ``divisor`` (``None``: not divided; ``"count"``: the valid tokens, at least 1)."""
    args = (logp_new, logp_old, advantages, mask, per_sequence, rollout_weights, process_group)
    if _fused.ENABLED:  # the fused passes: same terms, fewer passes
        cdtype = compute_dtype(logp_new, logp_old, advantages, rollout_weights)
        tail = REGULARIZER_LINEAR_TAIL
        return _fused.fused_token_terms(*args, sync_ess, stats, cdtype, tail, sums, divisor)
    out = _token_terms_reference(*args, sync_ess, stats)
    if sums:
        if isinstance(divisor, str):  # "count"
            divisor = out.num_tokens.clamp(min=1.0)
        mode = "token-sum" if divisor is None else "token-mean"
        policy = normalize(out.policy_loss.sum(), mode, divisor, None)
        regularizer = normalize(out.regularizer_loss.sum(), mode, divisor, None)
        out = out._replace(
            loss=policy + regularizer, policy_loss=policy, regularizer_loss=regularizer
        )
    return out


# --- end of dispatch ----------------------------------------------------------------------------


def _token_terms_reference(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    per_sequence: bool,
    rollout_weights: torch.Tensor | None,
    process_group: dist.ProcessGroup | None,
    sync_ess: bool,
    stats: ESSStats | None,
) -> ESSLossOutput:
    cdtype = compute_dtype(logp_new, logp_old, advantages, rollout_weights)
    valid = mask if mask.dtype == torch.bool else mask != 0
    # Sanitise first: masked positions hold 0 from here on, whatever they held (NaN, ±inf), so
    # no later operation, forward or backward, sees them (the backward of where is exactly 0
    # there: no 0 * NaN). Only logp_new carries a gradient; the cast back to its dtype in the
    # backward is autograd's own (fp16 overflow becomes inf, as a GradScaler expects).
    lp = torch.where(valid, logp_new.to(cdtype), 0.0)
    lo = torch.where(valid, logp_old.detach().to(cdtype), 0.0)
    adv = advantages.detach().to(cdtype)
    adv = torch.where(valid, adv.unsqueeze(-1) if adv.dim() == 1 else adv, 0.0)
    d = lp - lo
    d_const = d.detach()

    # ESS statistics of this call; in batch scope combined over ranks or replaced by the
    # caller's (e.g. the whole optimizer step's).
    local, shifted = masked_stats(d_const, valid, -1 if per_sequence else None)
    if per_sequence:
        log_ess = local.log_ess().unsqueeze(-1)  # (B, 1)
    elif stats is not None:
        log_ess = stats.log_ess().to(cdtype)
    else:
        log_ess = (all_reduce_stats(local, process_group) if sync_ess else local).log_ess()
    ess = log_ess.exp()
    one_minus_ess = -torch.expm1(log_ess)

    w = torch.exp(d_const)  # may overflow to inf: min(inf, ESS) = ESS
    rho = torch.minimum(w, ess)
    weight = rho * adv
    if rollout_weights is not None:
        weight = weight * torch.where(valid, rollout_weights.detach().to(cdtype), 0.0)
    policy = -weight * lp
    reg_k3 = k3(d)
    regularizer = one_minus_ess * reg_k3

    with torch.no_grad():
        diagnostics = _diagnostics(
            local, shifted, valid, w, ess, log_ess, reg_k3, per_sequence, d_const
        )
    return output(policy + regularizer, policy, regularizer, diagnostics)


def output(
    loss: torch.Tensor,
    policy: torch.Tensor,
    regularizer: torch.Tensor,
    diagnostics: tuple[torch.Tensor, ...],
) -> ESSLossOutput:
    """The result from the loss terms and :func:`_diagnostics`' tuple (its order, not the
    result's)."""
    ess_mean, ess_min, capped_frac, capped_mass, kl, r_mean, r_max, r_min, n = diagnostics
    return ESSLossOutput(
        loss, ess_mean, ess_min, capped_frac, kl, r_mean, r_max, policy, regularizer, n,
        capped_mass, r_min,
    )  # fmt: skip


def ess_summary(
    local: ESSStats, ess: torch.Tensor, per_sequence: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ess, ess_min, log sum of ratios)`` of a call: in sequence scope the mean and minimum
    over non-empty rows (1 when there are none), else the batch ESS twice."""
    if not per_sequence:
        return ess, ess, local.log_sum_w
    n = local.count.sum()
    nonempty = local.count > 0
    ess_rows = ess.squeeze(-1)
    n_seq = nonempty.sum().clamp(min=1)
    ess_mean = torch.where(nonempty.any(), torch.where(nonempty, ess_rows, 0.0).sum() / n_seq, 1.0)
    ess_min = reduce_nonempty(torch.where(nonempty, ess_rows, 1.0), "amin", None, 1.0)
    log_sum_w = torch.logsumexp(local.log_sum_w, dim=0) if local.count.numel() else n.log()
    return ess_mean, ess_min, log_sum_w


def _diagnostics(
    local: ESSStats,
    shifted: torch.Tensor,
    valid: torch.Tensor,
    w: torch.Tensor,
    ess: torch.Tensor,
    log_ess: torch.Tensor,
    reg_k3: torch.Tensor,
    per_sequence: bool,
    d: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    n = local.count.sum()
    n_safe = n.clamp(min=1.0)
    has_tokens = n > 0
    ess_mean, ess_min, log_sum_w = ess_summary(local, ess, per_sequence)
    if per_sequence:
        cap_level = torch.exp(log_ess - local.shift.unsqueeze(-1))  # ESS in shifted units
        excess = torch.relu(shifted - cap_level).sum(dim=-1)
    else:
        excess = torch.relu(shifted - torch.exp(log_ess - local.shift)).sum()
    capped = (valid & (w > ess)).sum()
    shift_max = reduce_nonempty(
        torch.where(local.count > 0, local.shift, float("-inf")), "amax", None, 0.0
    )
    ratio_max = torch.where(has_tokens, torch.exp(shift_max), 1.0)
    ratio_min = torch.exp(reduce_nonempty(torch.where(valid, d, float("inf")), "amin", None, 0.0))
    ratio_mean = torch.where(has_tokens, torch.exp(log_sum_w - torch.log(n_safe)), 1.0)
    # Ratios beyond float32's range (log ratio > 88) are reported saturated, not as inf.
    fmax = torch.finfo(torch.float32).max
    values = (
        ess_mean,
        ess_min,
        capped.to(n.dtype) / n_safe,
        _combine_shifted(local, excess),
        reg_k3.sum() / n_safe,
        ratio_mean.clamp(max=fmax),
        ratio_max.clamp(max=fmax),
        torch.where(has_tokens, ratio_min, 1.0),
        n,
    )
    return tuple(v.reshape(()).to(torch.float32) for v in values)


def ess_token_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ess_scope: ESSScope | None = None,
    rollout_weights: torch.Tensor | None = None,
    process_group: dist.ProcessGroup | None = None,
    sync_ess: bool = True,
    stats: ESSStats | None = None,
    check_values: bool = False,
) -> ESSLossOutput:
    r"""The per-token ESS objective, ``(B, T)``, with the ESS held constant, and its diagnostics.

    .. math::

        \ell_t = -\mathrm{sg}\big(\min(w_t, \mathrm{ESS})\big)\, c_t\, A_t \log\pi_\theta(t)
            + (1 - \mathrm{ESS})\,k_3(d_t)

    (see :func:`ess_po.ess_policy_loss` for the symbols and the arguments, which are the same
    except the aggregation). For a framework that aggregates per-token losses itself (verl's
    ``agg_loss``): aggregating ``loss`` with ``mask`` as :func:`ess_po.ess_policy_loss` would
    gives the same value and gradient.

    Returns:
        :class:`~ess_po.ESSLossOutput`: ``loss``, ``policy_loss`` and ``regularizer_loss`` of shape
        ``(B, T)`` (0 at masked positions, in float32, float64 if an input is float64) and
        0-dim float32 diagnostics.

    Example:
        >>> import torch
        >>> logp_new = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
        >>> adv, mask = torch.tensor([2.0]), torch.ones(1, 3)
        >>> out = ess_token_loss(logp_new, logp_new.detach(), adv, mask)
        >>> out.loss.detach()  # on-policy: -A * logp_new
        tensor([[2., 4., 1.]])
        >>> out.ess, out.capped_mass
        (tensor(1.), tensor(0.))
    """
    return checked_token_terms(
        logp_new, logp_old, advantages, mask, ess_scope, rollout_weights, process_group,
        sync_ess, stats, check_values, sums=False,
    )  # fmt: skip


def checked_token_terms(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ess_scope: ESSScope | None,
    rollout_weights: torch.Tensor | None,
    process_group: dist.ProcessGroup | None,
    sync_ess: bool,
    stats: ESSStats | None,
    check_values: bool,
    sums: bool,
    divisor: _fused.Divisor | str = None,
) -> ESSLossOutput:
    """:func:`ess_token_loss` (``sums=False``), or the 0-dim sums of its three terms over the
    tokens divided by ``divisor`` (``sums=True``, for :func:`ess_po.ess_policy_loss`'s token
    modes; ``None``: token-sum, ``"count"``: the call's valid tokens, at least 1)."""
    ess_scope = resolve_scope(ess_scope, stats)
    check_loss_inputs(logp_new, logp_old, advantages, mask, rollout_weights)
    if stats is not None:
        check_stats(stats, ess_scope, logp_new.device)
    if check_values:
        check_loss_values(logp_new, logp_old, advantages, mask, rollout_weights, stats)
    with autocast_off(logp_new.device):
        return _token_terms(
            logp_new,
            logp_old,
            advantages,
            mask,
            ess_scope == "sequence",
            rollout_weights,
            process_group,
            sync_ess,
            stats,
            sums,
            divisor,
        )
