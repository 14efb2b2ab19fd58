r"""The normalized effective sample size (ESS) of importance ratios, from log-space statistics.

For log ratios :math:`\ell_t = \log w_t` over the :math:`n` valid tokens,

.. math::

    \mathrm{ESS} = \frac{(\sum_t w_t)^2}{n \sum_t w_t^2}
                 = \exp\big(2\,\mathrm{LSE}(\ell) - \mathrm{LSE}(2\ell) - \log n\big)
                 \in [1/n,\ 1].

The sufficient statistics :class:`ESSStats` ``(LSE(ℓ), LSE(2ℓ), n)`` combine exactly across
micro-batches (:meth:`ESSStats.merge`) and data-parallel ranks (:func:`all_reduce_stats`, one
all-reduce), so the ESS of a split batch equals the ESS of the whole batch. Computing them in log
space with a max shift keeps log ratios of ±80 and beyond finite (a direct ``exp`` would overflow
and make ESS look like 1).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from ess_po._validation import _describe


class ESSStats(NamedTuple):
    """Log-space sufficient statistics of importance ratios.

    Attributes:
        log_sum_w: :math:`\\log \\sum_t w_t` (``-inf`` when there are no valid tokens).
        log_sum_w2: :math:`\\log \\sum_t w_t^2`.
        count: number of valid tokens :math:`n` (floating point).

    All three have the same shape: ``()`` for a batch, ``(B,)`` per sequence.
    """

    log_sum_w: torch.Tensor
    log_sum_w2: torch.Tensor
    count: torch.Tensor

    def merge(self, other: ESSStats) -> ESSStats:
        """Statistics of the union of two disjoint sets of tokens."""
        return ESSStats(
            torch.logaddexp(self.log_sum_w, other.log_sum_w),
            torch.logaddexp(self.log_sum_w2, other.log_sum_w2),
            self.count + other.count,
        )

    def log_ess(self) -> torch.Tensor:
        """:math:`\\log \\mathrm{ESS}` in ``[-log n, 0]``; 0 (ESS = 1) when there are no tokens."""
        n = self.count
        raw = 2.0 * self.log_sum_w - self.log_sum_w2 - torch.log(n.clamp(min=1.0))
        # Clamp away rounding outside the mathematical range; n = 0 means "nothing to correct".
        raw = torch.minimum(torch.maximum(raw, -torch.log(n.clamp(min=1.0))), torch.zeros_like(raw))
        return torch.where(n > 0, raw, torch.zeros_like(raw))

    def ess(self) -> torch.Tensor:
        """The normalized effective sample size, in ``[1/n, 1]``."""
        return self.log_ess().exp()


def _stats_from_masked_log_ratio(masked_lw: torch.Tensor, dim: int | None) -> ESSStats:
    """Statistics from log ratios that hold ``-inf`` at masked positions.

    Shifting by the maximum makes every exponent <= 0: no overflow, and the largest term is 1.
    """
    if dim is None:
        m = masked_lw.amax()
        count_shape: tuple[int, ...] = ()
    else:
        m = masked_lw.amax(dim=dim, keepdim=True)
        count_shape = tuple(s for i, s in enumerate(masked_lw.shape) if i != dim % masked_lw.dim())
    # All-masked rows have max -inf; shift them by 0 so exp(-inf - 0) = 0, not NaN.
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(masked_lw - m)
    if dim is None:
        flat = e.reshape(-1)
        s1, s2 = flat.sum(), torch.dot(flat, flat)
    else:
        s1, s2 = e.sum(dim=dim), (e * e).sum(dim=dim)
        m = m.squeeze(dim)
    count = torch.isfinite(masked_lw).sum(dim=dim).to(e.dtype).reshape(count_shape)
    return ESSStats(m + torch.log(s1), 2.0 * m + torch.log(s2), count)


def ess_stats(
    log_ratio: torch.Tensor, mask: torch.Tensor | None = None, *, dim: int | None = None
) -> ESSStats:
    """Log-space sufficient statistics of the ratios ``exp(log_ratio)`` at valid positions.

    Args:
        log_ratio: log importance ratios, e.g. ``logp_new - logp_old``, any shape, e.g. ``(B, T)``.
        mask: same shape, bool or 0/1; ``None`` means every position is valid. Masked positions
            may hold anything (``-inf``, NaN): they are never read.
        dim: reduce over this dimension only (``dim=-1`` gives per-sequence statistics of shape
            ``(B,)``); ``None`` reduces over everything.

    Returns:
        :class:`ESSStats` in float32 (float64 if ``log_ratio`` is float64).

    Example:
        >>> import torch
        >>> lw = torch.tensor([[0.0, 0.0, 80.0], [0.0, 0.0, 0.0]])
        >>> ess_stats(lw, dim=-1).ess()
        tensor([0.3333, 1.0000])
    """
    if mask is not None and mask.shape != log_ratio.shape:
        raise ValueError(
            f"mask must have the shape of log_ratio {tuple(log_ratio.shape)}, got "
            f"{tuple(mask.shape)}."
        )
    if not log_ratio.is_floating_point():
        raise ValueError(f"log_ratio must be floating point, got {_describe(log_ratio)}.")
    lw = log_ratio.detach()
    if lw.dtype != torch.float64:
        lw = lw.float()
    neg_inf = torch.tensor(float("-inf"), dtype=lw.dtype, device=lw.device)
    valid = torch.isfinite(lw) if mask is None else mask.bool()
    return _stats_from_masked_log_ratio(torch.where(valid, lw, neg_inf), dim)


def _default_group_size(process_group: dist.ProcessGroup | None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def all_reduce_stats(
    stats: ESSStats, process_group: dist.ProcessGroup | None = None
) -> ESSStats:
    """Combine batch-scope statistics over the ranks of ``process_group`` with one all-reduce.

    Each rank writes its ``(LSE(ℓ), LSE(2ℓ), n)`` into its own row of a ``(world, 3)`` buffer of
    zeros; a sum all-reduce then gathers every rank's row, and a log-sum-exp over rows combines
    them exactly. Ranks with no valid tokens contribute ``-inf`` rows, which combine as zero mass.
    A no-op when torch.distributed is not initialised or has one rank.
    """
    world = _default_group_size(process_group)
    if world == 1:
        return stats
    rank = dist.get_rank(process_group)
    local = torch.stack([stats.log_sum_w, stats.log_sum_w2, stats.count]).reshape(1, 3)
    rows = torch.arange(world, device=local.device).reshape(world, 1) == rank
    buf = torch.where(rows, local, torch.zeros_like(local))
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=process_group)
    return ESSStats(
        torch.logsumexp(buf[:, 0], dim=0),
        torch.logsumexp(buf[:, 1], dim=0),
        buf[:, 2].sum(),
    )


def effective_sample_size(
    log_ratio: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    dim: int | None = None,
    process_group: dist.ProcessGroup | None = None,
    sync: bool = True,
) -> torch.Tensor:
    r"""Normalized effective sample size :math:`(\sum w)^2 / (n \sum w^2)` of ``exp(log_ratio)``.

    Args:
        log_ratio: log importance ratios, e.g. ``(B, T)``.
        mask: bool or 0/1 of the same shape; ``None`` = all finite positions are valid.
        dim: ``None`` for one ESS over all valid tokens; ``-1`` for one per sequence, ``(B,)``.
        process_group: group for the all-reduce (default: the default group).
        sync: when torch.distributed is initialised with more than one rank and ``dim`` is
            ``None``, compute the ESS of the valid tokens of all ranks together.

    Returns:
        Detached float32 tensor in ``[1/n, 1]``; 1 where there are no valid tokens.

    Example:
        >>> import torch
        >>> effective_sample_size(torch.zeros(2, 3))  # all ratios equal
        tensor(1.)
        >>> effective_sample_size(torch.tensor([[0.0, -100.0, -100.0, -100.0]]))  # one dominates
        tensor(0.2500)
    """
    stats = ess_stats(log_ratio, mask, dim=dim)
    if sync and dim is None:
        stats = all_reduce_stats(stats, process_group)
    return stats.ess()
