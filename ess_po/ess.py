r"""The normalized effective sample size (ESS) of importance ratios, from log-space statistics.

For log ratios :math:`\ell_t = \log w_t` over the :math:`n` valid tokens,

.. math::

    \mathrm{ESS} = \frac{(\sum_t w_t)^2}{n \sum_t w_t^2}
                 = \exp\big(2\,\mathrm{LSE}(\ell) - \mathrm{LSE}(2\ell) - \log n\big)
                 \in [1/n,\ 1].

The sufficient statistics :class:`ESSStats` (a shift, two shifted log-sums, n) combine exactly across
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


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype statistics and losses are computed in: float64 for float64 input, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class ESSStats(NamedTuple):
    r"""Log-space sufficient statistics of importance ratios :math:`w_t = e^{\ell_t}`.

    With a shift :math:`s` (the largest log ratio), ``log_s1`` :math:`= \log\sum_t e^{\ell_t - s}`
    and ``log_s2`` :math:`= \log\sum_t e^{2(\ell_t - s)}`, so :math:`\log\sum_t w_t = s +`
    ``log_s1`` and :math:`\log\mathrm{ESS} = 2\,` ``log_s1`` :math:`-` ``log_s2`` :math:`-\log n`:
    the shift cancels, so equal ratios give ESS = 1 exactly, whatever their size.

    Attributes:
        shift: the shift :math:`s` (0 when there are no valid tokens).
        log_s1: shifted log-sum of ratios; ``-inf`` when there are no valid tokens.
        log_s2: shifted log-sum of squared ratios; ``-inf`` when there are no valid tokens.
        count: number of valid tokens :math:`n` (floating point).

    All fields have the same shape: ``()`` for a batch, ``(B,)`` per sequence.
    """

    shift: torch.Tensor
    log_s1: torch.Tensor
    log_s2: torch.Tensor
    count: torch.Tensor

    @property
    def log_sum_w(self) -> torch.Tensor:
        r""":math:`\log \sum_t w_t`."""
        return self.shift + self.log_s1

    def merge(self, other: ESSStats) -> ESSStats:
        """Statistics of the union of two disjoint sets of tokens (exact, in log space)."""
        both = torch.maximum(self.shift, other.shift)
        shift = torch.where(
            self.count > 0, torch.where(other.count > 0, both, self.shift), other.shift
        )
        da, db = self.shift - shift, other.shift - shift
        return ESSStats(
            shift,
            torch.logaddexp(self.log_s1 + da, other.log_s1 + db),
            torch.logaddexp(self.log_s2 + 2.0 * da, other.log_s2 + 2.0 * db),
            self.count + other.count,
        )

    def log_ess(self) -> torch.Tensor:
        r""":math:`\log \mathrm{ESS}` in ``[-log n, 0]``; 0 (ESS = 1) when there are no tokens."""
        n = self.count
        log_n = torch.log(n.clamp(min=1.0))
        raw = 2.0 * self.log_s1 - self.log_s2 - log_n
        # Clamp away rounding outside the mathematical range; n = 0 means "nothing to correct".
        raw = torch.minimum(torch.maximum(raw, -log_n), torch.zeros_like(raw))
        return torch.where(n > 0, raw, torch.zeros_like(raw))

    def ess(self) -> torch.Tensor:
        """The normalized effective sample size, in ``[1/n, 1]``."""
        return self.log_ess().exp()


def stats_from_masked_log_ratio(
    masked_lw: torch.Tensor,
    count: torch.Tensor,
    dim: int | None,
    *,
    overwrite: bool = False,
    valid: torch.Tensor | None = None,
) -> ESSStats:
    """Statistics from log ratios that hold ``-inf`` (or -1e30) at masked positions.

    Shifting by the maximum makes every exponent <= 0: no overflow, and the largest term is 1.
    ``count`` is the number of valid positions, reduced like ``dim``. With ``overwrite`` the
    exponentials are formed in ``masked_lw``'s own memory (no new (B, T) buffer); ``valid``
    (0/1 float, optional) zeroes masked positions without exponentiating their padding.
    """
    shift = masked_lw.amax() if dim is None else masked_lw.amax(dim=dim, keepdim=True)
    # All-masked rows have a max of -inf (or the padding value); shift them by 0 so that
    # exp(-inf - 0) = 0, not NaN, and mark them empty below.
    shift = torch.where(torch.isfinite(shift), shift, 0.0)
    e = masked_lw.sub_(shift) if overwrite else masked_lw - shift
    # exp of a huge negative number takes a slow path on CPU: with ``valid``, exponentiate 0
    # at masked positions and zero them after.
    e = e.exp_() if valid is None else e.mul_(valid).exp_().mul_(valid)
    if dim is None:
        flat = e.reshape(-1)
        s1, s2 = flat.sum(), torch.dot(flat, flat)
    else:
        s1, s2 = e.sum(dim=dim), torch.linalg.vecdot(e, e, dim=dim)
        shift = shift.squeeze(dim)
    count = count.to(e.dtype)
    # Empty sets have e == 0 everywhere, so their log-sums are already -inf.
    return ESSStats(torch.where(count == 0, 0.0, shift), torch.log(s1), torch.log(s2), count)


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
    lw = log_ratio.detach().to(compute_dtype(log_ratio))
    valid = torch.isfinite(lw) if mask is None else mask.bool()
    return stats_from_masked_log_ratio(
        torch.where(valid, lw, float("-inf")), valid.sum(dim=dim), dim
    )


def _default_group_size(process_group: dist.ProcessGroup | None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def all_reduce_stats(stats: ESSStats, process_group: dist.ProcessGroup | None = None) -> ESSStats:
    """Combine batch-scope statistics over the ranks of ``process_group`` with one all-reduce.

    Each rank writes its four statistics into its own row of a ``(world, 4)`` buffer of zeros; a
    sum all-reduce then gathers every rank's row, and a re-shifted log-sum-exp over rows combines
    them exactly. Ranks with no valid tokens contribute ``-inf`` sums, which combine as zero mass.
    A no-op when torch.distributed is not initialised or has one rank.
    """
    world = _default_group_size(process_group)
    if world == 1:
        return stats
    rank = dist.get_rank(process_group)
    local = torch.stack(list(stats)).reshape(1, 4)
    rows = torch.arange(world, device=local.device).reshape(world, 1) == rank
    buf = torch.where(rows, local, torch.zeros_like(local))
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=process_group)
    shift, log_s1, log_s2, count = buf.unbind(1)
    nonempty = count > 0
    top = torch.where(nonempty, shift, float("-inf")).amax()
    top = torch.where(torch.isfinite(top), top, 0.0)
    delta = torch.where(nonempty, shift - top, 0.0)
    return ESSStats(
        top,
        torch.logsumexp(log_s1 + delta, dim=0),
        torch.logsumexp(log_s2 + 2.0 * delta, dim=0),
        count.sum(),
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
