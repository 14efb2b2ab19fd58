r"""Policy losses compared by the off-policy study, and the ESS regulariser-tail variants.

All losses take per-token log-probabilities ``logp`` :math:`(B, T)` of the current policy,
behaviour log-probabilities ``behaviour`` :math:`\log\mu` :math:`(B, T)`, advantages
:math:`(B,)` and a mask :math:`(B, T)`, and return a token-mean over valid tokens (divided by
``normalizer`` when a batch is split into micro-batches). :math:`d = \log\pi_\theta - \log\mu`,
:math:`w = e^d`.

* ``ess``: the library's objective, ``ess_po.ess_policy_loss`` (regulariser
  :math:`k_3(d) = d + e^{-d} - 1`, continued linearly below :math:`d = -50`).
* ``ess-ref`` variants (:func:`ess_variant_loss`, written here from the formula with autograd,
  ESS from ``ess_po.effective_sample_size``), differing only in the regulariser's tail:

  - ``tail="linear"``, threshold :math:`L`: :math:`e^{-d}` continued by its tangent below
    :math:`d = -L`; the gradient of :math:`k_3` is :math:`1 - e^{\min(-d, L)}`, bounded by
    :math:`e^L` and always pulling :math:`d` back up. :math:`L = 50` is the library's
    (``test_offpolicy_study.py`` checks loss and gradient equal the core's); ``ess-tail10`` uses
    :math:`L = 10`.
  - ``tail="clamp"``: the authors' reference implementation, :math:`d + e^{\operatorname{clamp}(-d,
    -10, 10)} - 1`: below :math:`d = -10` the exponential is constant, so the gradient is
    :math:`+1`: it pushes :math:`d` further down (sign flip), with magnitude 1.

* ``clip-ε`` / ``clip-higher``: PPO/GRPO clipped surrogate; DAPO's asymmetric [1-0.2, 1+0.28].
* ``cispo``: :math:`-\mathrm{sg}(\min(w, 1+\epsilon_{high}))A\log\pi_\theta`, :math:`\epsilon_{high} = 5`.
* ``tis``: the clip-0.2 surrogate around the trainer's recomputed :math:`\log\pi_{old}`, each token
  weighted by :math:`\mathrm{sg}(\min(e^{\log\pi_{old} - \log\mu}, C))`, :math:`C = 2` (truncated
  importance sampling of the rollout mismatch, as TRL's and verl's rollout corrections apply it).
* ``mis``: the same, with tokens whose mismatch ratio :math:`e^{\log\pi_{old} - \log\mu}` lies
  outside :math:`[1/C, C]` masked out (weight 0; masked importance sampling, token level).

Clipped surrogate, CISPO and TIS formulas are ``benchmarks/baselines.py``'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import baselines
import torch

from ess_po import ESSStats, effective_sample_size, ess_policy_loss

CORRECTION_CAP = 2.0
"""Cap :math:`C` of TIS and MIS."""


@dataclass(frozen=True)
class Method:
    """A policy loss. ``kind`` selects the formula; ``in_grid`` marks the clip grid.

    ``tail``/``threshold`` select the ESS regulariser tail (``kind="ess-ref"``);
    ``micro_batch`` (sequences per loss call, 0 = the whole batch) and ``scope`` (``"call"``:
    one ESS per loss call; ``"step"``: one ESS over the whole optimizer step, given to every
    call) are issue 15's micro-batch comparison.
    """

    name: str
    kind: str
    eps_low: float = 0.0
    eps_high: float = 0.0
    tail: str = "linear"
    threshold: float = 50.0
    micro_batch: int = 0
    scope: str = "call"
    in_grid: bool = False
    cap: bool = True
    vcpo: bool = False  # VCPO's rule: the update's learning rate times sqrt(ESS of pi/mu)

    @property
    def is_ess(self) -> bool:
        return self.kind in ("ess", "ess-ref", *PROXIMAL_KINDS)

    @property
    def needs_trainer_old(self) -> bool:
        """Needs the trainer's recompute before the batch's first update (TIS/MIS's old
        log-probs; the proximal policy of the proximal losses)."""
        return self.kind in ("tis", "mis", "decoupled-clip", *PROXIMAL_KINDS)


PROXIMAL_KINDS = ("p4o", "prox", "dec")
"""Kinds of :mod:`offpolicy.proximal`'s candidate losses."""


def k3(d: torch.Tensor, *, tail: str = "linear", threshold: float = 50.0) -> torch.Tensor:
    r"""The regulariser :math:`d + e^{-d} - 1` with the given tail (see the module docstring)."""
    if tail == "linear":
        inner = torch.expm1(-torch.clamp(d, min=-threshold))
        return d + inner + math.exp(threshold) * torch.clamp(-threshold - d, min=0.0)
    if tail == "clamp":
        return d + torch.expm1(torch.clamp(-d, -threshold, threshold))
    if tail == "none":  # ablation: no regulariser
        return torch.zeros_like(d)
    raise ValueError(f"tail must be 'linear', 'clamp' or 'none', got {tail!r}")


def ess_variant_loss(
    logp: torch.Tensor,
    behaviour: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    tail: str = "linear",
    threshold: float = 50.0,
    ess: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
    cap: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""ESS objective, token-mean: :math:`\frac1N\sum_t -\mathrm{sg}(\min(w_t, \mathrm{ESS}))A_t
    \log\pi_\theta + (1-\mathrm{ESS})k_3(d_t)`; returns ``(loss, ess)``.

    ``ess``: precomputed (step-scope) ESS; default: the ESS of this call's valid tokens.
    ``normalizer``: :math:`N`; default: this call's valid-token count. ``cap=False``
    (ablation): weight :math:`w_t` instead of :math:`\min(w_t, \mathrm{ESS})`.
    """
    m = mask.to(logp.dtype)
    d = logp - behaviour
    if ess is None:
        ess = effective_sample_size(d.detach(), mask)
    rho = torch.minimum(d.detach().exp(), ess) if cap else d.detach().exp()
    per_token = -rho * advantages.unsqueeze(-1) * logp + (1.0 - ess) * k3(
        d, tail=tail, threshold=threshold
    )
    n = m.sum().clamp(min=1.0) if normalizer is None else normalizer
    return (per_token * m).sum() / n, ess


def mis_clipped(lp, trainer_old, behaviour, adv, mask, cap=CORRECTION_CAP, eps=0.2):
    """Clipped surrogate around ``trainer_old``, tokens with mismatch ratio outside [1/cap, cap] dropped."""
    r = (trainer_old - behaviour).detach()
    keep = (r.abs() <= math.log(cap)).to(lp.dtype)
    per = baselines._clipped_per_token(lp, trainer_old, adv, eps, eps)
    m = mask.to(lp.dtype)
    return (keep * per * m).sum() / m.sum().clamp(min=1.0)


def policy_loss(
    method: Method,
    logp: torch.Tensor,
    behaviour: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    trainer_old: torch.Tensor | None = None,
    *,
    ess: torch.Tensor | None = None,
    stats: ESSStats | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of ``method`` on one (micro-)batch; returns ``(loss, extra diagnostics)``.

    ``stats`` (library ESS) / ``ess`` (``ess-ref``): the step-scope ESS of a micro-batched update;
    ``normalizer``: the update's valid-token count (token-mean over the whole update).
    """
    if method.kind == "ess":
        out = ess_policy_loss(logp, behaviour, advantages, mask, normalizer=normalizer, stats=stats)
        return out.loss, {"capped_frac": float(out.capped_frac), "call_ess": float(out.ess)}
    if method.kind == "ess-ref":
        loss, e = ess_variant_loss(
            logp,
            behaviour,
            advantages,
            mask,
            tail=method.tail,
            threshold=method.threshold,
            ess=ess,
            normalizer=normalizer,
            cap=method.cap,
        )
        return loss, {"call_ess": float(e)}
    if method.kind in PROXIMAL_KINDS or method.kind == "decoupled-clip":
        from offpolicy import proximal

        if trainer_old is None or normalizer is not None:
            raise ValueError(f"{method.name} needs the proximal log-probs and one call per update")
        if method.kind == "decoupled-clip":
            loss = proximal.decoupled_clip(logp, behaviour, trainer_old, advantages, mask)
            return loss, {}
        return proximal.proximal_loss(method.kind, logp, behaviour, trainer_old, advantages, mask)
    if normalizer is not None:
        raise ValueError(f"micro-batching is only implemented for ESS methods, not {method.name}")
    if method.kind == "clipped":
        return baselines.clipped(
            logp, behaviour, advantages, mask, method.eps_low, method.eps_high
        ), {}
    if method.kind == "cispo":
        return baselines.cispo(logp, behaviour, advantages, mask, method.eps_high), {}
    if method.kind in ("tis", "mis"):
        if trainer_old is None:
            raise ValueError(f"{method.kind} needs the trainer's recomputed old log-probabilities")
        if method.kind == "tis":
            loss = baselines.tis_clipped(
                logp, trainer_old, behaviour, advantages, mask, CORRECTION_CAP, 0.2, 0.2
            )
        else:
            loss = mis_clipped(logp, trainer_old, behaviour, advantages, mask)
        return loss, {}
    raise ValueError(f"unknown method kind {method.kind!r}")


def ratio_diagnostics(logp: torch.Tensor, behaviour: torch.Tensor, mask: torch.Tensor):
    """ESS, mean k3, smallest log-ratio and fraction of tokens with d < -10, before an update."""
    valid = mask.bool()
    d = (logp - behaviour).detach()[valid]
    if d.numel() == 0:
        return {"ess": 1.0, "kl": 0.0, "log_ratio_min": 0.0, "frac_below_10": 0.0}
    return {
        "ess": float(effective_sample_size(d)),
        "kl": float((d + torch.expm1(-d)).mean()),
        "log_ratio_min": float(d.min()),
        "frac_below_10": float((d < -10).float().mean()),
    }


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("ess", "ess"),
        Method("ess-clamp10", "ess-ref", tail="clamp", threshold=10.0),
        Method("ess-tail10", "ess-ref", tail="linear", threshold=10.0),
        Method("clip-0.1", "clipped", 0.1, 0.1, in_grid=True),
        Method("clip-0.2", "clipped", 0.2, 0.2, in_grid=True),
        Method("clip-0.4", "clipped", 0.4, 0.4, in_grid=True),
        Method("clip-0.6", "clipped", 0.6, 0.6, in_grid=True),
        Method("clip-higher", "clipped", 0.2, 0.28, in_grid=True),
        Method("cispo", "cispo", 0.0, 5.0),
        Method("tis", "tis", 0.2, 0.2),
        Method("mis", "mis", 0.2, 0.2),
    )
}
"""The full study's methods."""

ABLATION_METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("ess-noreg", "ess-ref", tail="none"),
        Method("ess-nocap", "ess-ref", cap=False),
    )
}
r"""Ablations of the ESS objective (not in the default run; ``--methods ess-noreg ...``):
without the regulariser, and with the uncapped weight :math:`w` in place of
:math:`\min(w, \mathrm{ESS})`."""

QUICK_METHODS = (
    "ess",
    "ess-clamp10",
    "ess-tail10",
    "clip-0.2",
    "clip-higher",
    "cispo",
    "tis",
    "mis",
)

PHASE2_METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("ess-whole", "ess"),
        Method("ess-mb8-call", "ess", micro_batch=8, scope="call"),
        Method("ess-mb8-step", "ess", micro_batch=8, scope="step"),
        Method("ess-mb1-call", "ess", micro_batch=1, scope="call"),
        Method("ess-mb1-step", "ess", micro_batch=1, scope="step"),
    )
}
"""Issue 15's comparison, with the library's loss (``ess_po.ess_policy_loss``): one call per
update (whole step), 8 calls of 8 sequences and 64 calls of 1, each with per-call ESS or the
step's statistics (``ess_po.step_stats``, passed as ``stats=`` to every call)."""


MAP_METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("ess", "ess"),
        Method("ess-p4o", "p4o"),
        Method("ess-prox", "prox"),
        Method("ess-dec", "dec"),
        Method("ess-prox-vcpo", "prox", vcpo=True),
        Method("ess-vcpo", "ess", vcpo=True),
        Method("clip-0.2", "clipped", 0.2, 0.2, in_grid=True),
        Method("clip-0.4", "clipped", 0.4, 0.4, in_grid=True),
        Method("clip-vcpo", "clipped", 0.2, 0.2, vcpo=True),
        Method("decoupled-clip", "decoupled-clip", 0.2, 0.2),
        Method("tis", "tis", 0.2, 0.2),
    )
}
"""The stale-rollout study's methods (docs/results/offpolicy/map/SELECTION_RULE.md): the
candidates with a proximal policy (``ess-p4o``, ``ess-prox``, ``ess-dec``, ``ess-prox-vcpo``),
the paper's objective and the baselines."""

CANDIDATES = ("ess-p4o", "ess-prox", "ess-dec", "ess-prox-vcpo")
"""The candidates the selection rule decides between."""

CONFIRM_METHODS = ("ess", *CANDIDATES, "clip-0.2", "clip-0.4")
"""Methods of the confirmation task (fixed before the runs)."""
