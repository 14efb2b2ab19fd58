"""Aggregation of ``(B, T)`` per-token losses into the scalar a trainer minimises.

The four modes of :data:`ess_po.AggMode`, as verl and TRL define them. Masked positions must
already hold 0; ``valid`` only counts tokens and sequences.
"""

from __future__ import annotations

import torch


def aggregate(
    token_loss: torch.Tensor,
    valid: torch.Tensor | None,
    mode: str,
    normalizer: float | torch.Tensor | None,
    num_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scalar of ``token_loss`` (``(B, T)``, 0 at masked positions) under ``mode``.

    ``normalizer`` (a positive Python number or a 0-dim tensor) replaces the call's own count
    (valid tokens for token-mean; non-empty sequences for seq-mean-*); a Python number is
    divided by directly, so it never becomes a tensor. Fully masked sequences are not counted by
    the seq-mean modes, as in verl's ``agg_loss``. ``num_tokens``, the count of valid tokens when
    the caller has it, spares token-mean a pass over ``valid`` (which may then be ``None``; the
    seq-mean modes need it).
    """
    if mode == "token-sum":
        return token_loss.sum()
    if mode == "seq-mean-token-mean":
        rows = valid.sum(dim=-1)  # type: ignore[union-attr]
        per_seq = token_loss.sum(dim=-1) / rows.clamp(min=1).to(token_loss.dtype)
        total = per_seq.sum()
    else:
        total = token_loss.sum()
    if normalizer is None:
        if mode == "token-mean":
            count = num_tokens if num_tokens is not None else valid.sum()  # type: ignore[union-attr]
        else:
            count = valid.any(dim=-1).sum()  # type: ignore[union-attr]
        normalizer = count.clamp(min=1).to(token_loss.dtype)
    elif isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(token_loss.dtype)
    return total / normalizer
