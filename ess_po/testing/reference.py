"""A deliberately naive reference of the ESS objective, written straight from the formula.

Plain autograd in float64, boolean masks, per-sequence Python loops: slow and obviously right.
The core's tests and the AReaL tests (inside AReaL's engine) compare against it.
"""

from __future__ import annotations

import torch


def naive_ess(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(Σw)² / (n Σw²) over the valid entries of a 1-D tensor; 1 if there are none."""
    w = log_ratio[mask.bool()].double().exp()
    if w.numel() == 0:
        return torch.tensor(1.0, dtype=torch.float64)
    return w.sum() ** 2 / (w.numel() * (w**2).sum())


def naive_ess_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_agg_mode: str = "token-mean",
    normalizer: float | None = None,
    ess_scope: str = "call",
    rollout_weights: torch.Tensor | None = None,
    ess: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss as a float64 scalar, differentiable w.r.t. ``logp_new`` by autograd.

    ``ess``: a given ESS for every token (e.g. the whole optimizer step's) instead of the one
    computed here over ``ess_scope``'s tokens."""
    B, T = logp_new.shape
    lp = logp_new.double()
    lo = logp_old.double().detach()
    m = mask.bool()
    adv = advantages.double().reshape(B, -1).expand(B, T)
    c = torch.ones(B, T, dtype=torch.float64) if rollout_weights is None else rollout_weights
    c = c.double()
    d_det = (lp - lo).detach()
    if ess is not None:
        ess = torch.as_tensor(ess, dtype=torch.float64).expand(B)
    elif ess_scope == "call":
        ess = naive_ess(d_det, m).expand(B)
    else:
        ess = torch.stack([naive_ess(d_det[b], m[b]) for b in range(B)])
    rows = []
    for b in range(B):
        v = m[b]
        d = lp[b][v] - lo[b][v]
        rho = torch.minimum(d.detach().exp(), ess[b])
        policy = -rho * adv[b][v] * c[b][v] * lp[b][v]
        reg = (1 - ess[b]) * (d + torch.exp(-d) - 1)
        rows.append(policy + reg)
    counts = m.sum(-1)
    if loss_agg_mode == "token-sum":
        return sum(r.sum() for r in rows)
    if loss_agg_mode == "token-mean":
        denom = normalizer if normalizer is not None else max(int(counts.sum()), 1)
        return sum(r.sum() for r in rows) / denom
    nonempty = [b for b in range(B) if counts[b] > 0]
    denom = normalizer if normalizer is not None else max(len(nonempty), 1)
    if loss_agg_mode == "seq-mean-token-sum":
        return sum(rows[b].sum() for b in nonempty) / denom if nonempty else lp.sum() * 0
    if loss_agg_mode == "seq-mean-token-mean":
        return sum(rows[b].mean() for b in nonempty) / denom if nonempty else lp.sum() * 0
    raise ValueError(loss_agg_mode)


def reinforce_loss(
    logp_new: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """-(A * logp * mask).sum() / n: the on-policy limit of the objective."""
    B, T = logp_new.shape
    adv = advantages.reshape(B, -1).expand(B, T)
    maskf = mask.to(logp_new.dtype)
    return -(adv * logp_new * maskf).sum() / maskf.sum().clamp(min=1)
