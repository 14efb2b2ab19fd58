r"""Losses with a proximal policy: the stale-rollout candidates and baselines, from their formulas.

Notation (token-mean over the valid tokens of one update): behaviour log-probs :math:`\log\mu`
(the sampler's), proximal log-probs :math:`\log\pi_{prox}` (the trainer's recompute before its
first update on the batch), :math:`d_b = \log\pi_\theta - \log\mu`,
:math:`d_p = \log\pi_\theta - \log\pi_{prox}`, :math:`w = e^d`, ESS the normalized effective
sample size over the valid tokens, :math:`k_3(d) = d + e^{-d} - 1`.

* ``p4o`` (the authors' P4O): cap :math:`\min(w_b, m)`, :math:`m = \min(ESS_b, ESS_p)`;
  regulariser :math:`(1 - m)\,k_3(\log\pi_\theta - \log\pi_{mix})`,
  :math:`\pi_{mix} = (u_b\mu + u_p\pi_{prox}) / (u_b + u_p)`, :math:`u = 1 - ESS`.
* ``prox`` (decoupled P3O): cap :math:`\min(w_b, ESS_b)`; regulariser
  :math:`(1 - ESS_b)\,k_3(d_p)`.
* ``dec`` (the cap from :math:`\pi/\pi_{prox}`): weight :math:`\min(v, ESS_v)\min(w_p, ESS_p)`,
  :math:`v = \pi_{prox}/\mu`; regulariser :math:`(1 - ESS_p)\,k_3(d_p)`.
* ``decoupled_clip`` (AReaL's decoupled PPO): clipped surrogate around :math:`\pi_{prox}`, each
  token weighted by :math:`v`, tokens with :math:`v >` ``cap`` dropped.

Each reduces to P3O (``ess_po.ess_policy_loss``) when :math:`\pi_{prox} = \mu`
(``test_offpolicy_study.py`` checks it). They run in the inputs' dtype (float64 for a float64
reference).
"""

from __future__ import annotations

import math

import baselines
import torch

from offpolicy.methods import k3


def ess_of(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ESS of ``exp(log_ratio)`` over ``mask``, shifted by the max (no gradient)."""
    valid = mask.bool()
    lr = torch.where(valid, log_ratio.detach(), float("-inf"))
    n = valid.sum()
    if int(n) == 0:
        return torch.ones((), dtype=log_ratio.dtype)
    lr = lr - lr.max()
    w = torch.where(valid, lr.exp(), 0.0)
    return (w.sum() ** 2 / (n * (w * w).sum())).clamp(max=1.0)


def _token_mean(per_token: torch.Tensor, mask: torch.Tensor, normalizer=None) -> torch.Tensor:
    m = mask.to(per_token.dtype)
    n = m.sum().clamp(min=1.0) if normalizer is None else normalizer
    return (per_token * m).sum() / n


def proximal_loss(
    kind: str,
    logp: torch.Tensor,
    behaviour: torch.Tensor,
    prox: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one of ``p4o``, ``prox``, ``dec``; returns ``(loss, diagnostics)``."""
    adv = advantages.unsqueeze(-1)
    d_b, d_p = logp - behaviour, logp - prox
    ess_b, ess_p = ess_of(d_b, mask), ess_of(d_p, mask)
    w_b, w_p = d_b.detach().exp(), d_p.detach().exp()
    if kind == "p4o":
        m = torch.minimum(ess_b, ess_p)
        rho = torch.minimum(w_b, m)
        u_b, u_p = 1.0 - ess_b, 1.0 - ess_p
        if float(u_b + u_p) > 0.0:
            log_mix = torch.logsumexp(
                torch.stack([torch.log(u_b) + behaviour, torch.log(u_p) + prox]), dim=0
            ) - torch.log(u_b + u_p)
            reg = (1.0 - m) * k3(logp - log_mix)
        else:
            reg = torch.zeros_like(logp)
    elif kind == "prox":
        rho = torch.minimum(w_b, ess_b)
        reg = (1.0 - ess_b) * k3(d_p)
    elif kind == "dec":
        log_v = (prox - behaviour).detach()
        ess_v = ess_of(log_v, mask)
        rho = torch.minimum(log_v.exp(), ess_v) * torch.minimum(w_p, ess_p)
        reg = (1.0 - ess_p) * k3(d_p)
    else:
        raise ValueError(f"unknown proximal loss {kind!r}")
    loss = _token_mean(-rho * adv * logp + reg, mask)
    return loss, {"ess_prox": float(ess_p), "call_ess": float(ess_b)}


def decoupled_clip(
    logp: torch.Tensor,
    behaviour: torch.Tensor,
    prox: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps: float = 0.2,
    cap: float = 5.0,
) -> torch.Tensor:
    """AReaL's decoupled PPO: ``v * clip-surrogate(π/π_prox)``, ``v = π_prox/μ``, tokens with
    ``v > cap`` dropped."""
    log_v = (prox - behaviour).detach()
    keep = (log_v <= math.log(cap)).to(logp.dtype)
    per = log_v.exp() * baselines._clipped_per_token(logp, prox, advantages, eps, eps)
    return _token_mean(keep * per, mask)
