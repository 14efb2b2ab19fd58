"""Random loss inputs for the core's tests: right-padded completions with known staleness."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """Inputs of :func:`ess_po.ess_policy_loss`: ``logp_new`` (requires grad), ``logp_old`` and
    ``mask`` of shape ``(B, T)``; ``advantages`` of shape ``(B,)``, ``(B, 1)`` or ``(B, T)``."""

    logp_new: torch.Tensor
    logp_old: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor


def make_batch(
    B: int = 4,
    T: int = 7,
    *,
    seed: int = 0,
    staleness: float = 0.5,
    dtype: torch.dtype = torch.float64,
    adv_shape: str = "B",
    empty_rows: int = 0,
) -> Batch:
    """Right-padded completions of random lengths; ``logp_old = logp_new + N(0, staleness²)``.

    ``adv_shape`` is ``"B"``, ``"B1"`` or ``"BT"``; the first ``empty_rows`` rows have no tokens.
    Values are drawn in float64 from ``seed`` and then cast to ``dtype``.
    """
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + staleness * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[:empty_rows] = 0
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    if adv_shape == "B":
        adv = torch.randn(B, generator=g, dtype=torch.float64)
    elif adv_shape == "B1":
        adv = torch.randn(B, 1, generator=g, dtype=torch.float64)
    else:
        adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    return Batch(logp.to(dtype).requires_grad_(True), old.to(dtype), adv.to(dtype), mask)
