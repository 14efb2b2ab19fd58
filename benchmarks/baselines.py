"""Baseline policy losses the ESS objective is compared against, written from their formulas.

All take ``(logp_new, logp_old, advantages, mask)`` with shapes ``(B, T), (B, T), (B,), (B, T)``
and return the token-mean loss over valid tokens. They are benchmark references, not part of
the library.

* ``reinforce``: -(A * logp * mask).sum() / n, the on-policy floor (no ratios at all).
* ``clipped``: the PPO/GRPO clipped surrogate, -min(w A, clip(w, 1 - eps_low, 1 + eps_high) A),
  as TRL's GRPOTrainer computes it; eps_high > eps_low is DAPO's clip-higher.
* ``cispo``: CISPO's capped score-function loss, -sg(min(w, 1 + eps_high)) A logp.
* ``iw_reinforce``: importance-weighted REINFORCE without clipping, -w A (score function
  through the ratio).
* ``tis``: truncated importance sampling of the behaviour/rollout mismatch, -sg(min(w_b, C)) A
  logp, where w_b = exp(logp_trainer_old - logp_behaviour) is the mismatch ratio.
* ``tis_clipped``: TIS as rollout-correction frameworks apply it (Yao et al. 2025, "Your efficient
  RL framework secretly brings you off-policy RL training"; verl's token-level truncated IS): the
  clipped surrogate with ratio exp(logp - logp_trainer_old), each token weighted by the truncated
  mismatch ratio sg(min(exp(logp_trainer_old - logp_behaviour), C)).
"""

from __future__ import annotations

import torch


def _mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1)


def reinforce(lp, old, adv, mask):
    return _mean(-adv.unsqueeze(-1) * lp, mask)


def _clipped_per_token(lp, old, adv, eps_low: float, eps_high: float) -> torch.Tensor:
    coef_1 = torch.exp(lp - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    a = adv.unsqueeze(-1)
    return -torch.min(coef_1 * a, coef_2 * a)


def clipped(lp, old, adv, mask, eps_low: float = 0.2, eps_high: float | None = None):
    eps_high = eps_low if eps_high is None else eps_high
    return _mean(_clipped_per_token(lp, old, adv, eps_low, eps_high), mask)


def cispo(lp, old, adv, mask, eps_high: float = 5.0):
    coef = torch.clamp(torch.exp(lp - old), max=1 + eps_high).detach()
    return _mean(-coef * adv.unsqueeze(-1) * lp, mask)


def iw_reinforce(lp, old, adv, mask):
    return _mean(-torch.exp(lp - old) * adv.unsqueeze(-1), mask)


def tis(lp, old, adv, mask, cap: float = 2.0):
    coef = torch.clamp(torch.exp(lp - old), max=cap).detach()
    return _mean(-coef * adv.unsqueeze(-1) * lp, mask)


def tis_clipped(
    lp,
    trainer_old,
    behaviour,
    adv,
    mask,
    cap: float = 2.0,
    eps_low: float = 0.2,
    eps_high: float | None = None,
):
    eps_high = eps_low if eps_high is None else eps_high
    weight = torch.clamp(torch.exp(trainer_old - behaviour), max=cap).detach()
    return _mean(weight * _clipped_per_token(lp, trainer_old, adv, eps_low, eps_high), mask)
