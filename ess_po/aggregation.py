"""Aggregation of ``(B, T)`` per-token losses into the scalar a trainer minimises.

The four modes of :data:`ess_po.AggMode`, as verl and TRL define them. Masked positions must
already hold 0; ``valid`` only counts tokens and sequences.
"""

from __future__ import annotations

import torch


def aggregate(
    token_loss: torch.Tensor,
    valid: torch.Tensor,
    mode: str,
    normalizer: float | torch.Tensor | None,
) -> torch.Tensor:
    """The scalar of ``token_loss`` (``(B, T)``, 0 at masked positions) under ``mode``.

    ``normalizer`` (a positive Python number or a 0-dim tensor) replaces the call's own count
    (valid tokens for token-mean; non-empty sequences for seq-mean-*). Fully masked sequences are
    not counted by the seq-mean modes, as in verl's ``agg_loss``.
    """
    if mode == "seq-mean-token-mean":
        rows = valid.sum(dim=-1)
        per_seq = token_loss.sum(dim=-1) / rows.clamp(min=1).to(token_loss.dtype)
        total = per_seq.sum()
    else:
        total = token_loss.sum()
    if mode.startswith("seq-mean"):
        count = valid.any(dim=-1).sum() if normalizer is None else None
    else:
        count = valid.sum() if mode == "token-mean" and normalizer is None else None
    return normalize(total, mode, normalizer, count)


def normalize(
    total: torch.Tensor,
    mode: str,
    normalizer: float | torch.Tensor | None,
    count: torch.Tensor | None,
) -> torch.Tensor:
    """``total`` (the 0-dim sum the mode averages) divided by ``normalizer`` or, when that is
    ``None``, by ``count`` (at least 1); token-sum is not divided. A Python ``normalizer`` is
    divided by directly, so it never becomes a tensor (no host-to-device copy)."""
    if mode == "token-sum":
        return total
    if normalizer is None:
        normalizer = count.clamp(min=1)  # type: ignore[union-attr]
    if isinstance(normalizer, torch.Tensor) and normalizer.dtype != total.dtype:
        normalizer = normalizer.to(total.dtype)
    return total / normalizer
