r"""The normalized effective sample size (ESS) of importance ratios, from log-space statistics.

For log ratios :math:`\ell_t = \log w_t` over the :math:`n` valid tokens,

.. math::

    \mathrm{ESS} = \frac{(\sum_t w_t)^2}{n \sum_t w_t^2}
                 = \exp\big(2\,\mathrm{LSE}(\ell) - \mathrm{LSE}(2\ell) - \log n\big)
                 \in [1/n,\ 1].

The sufficient statistics :class:`ESSStats` (a shift, two shifted log-sums, n) combine exactly across
micro-batches (:meth:`ESSStats.merge`) and data-parallel ranks (:func:`all_reduce_stats`, one
all-reduce), so the ESS of a split batch equals the ESS of the whole batch (:func:`step_stats`
builds the statistics of a whole optimizer step this way). Computing them in log space with a max
shift keeps log ratios of ±80 and beyond finite (a direct ``exp`` would overflow and make ESS look
like 1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.distributed as dist

from ess_po._validation import check_dim, check_tensor
from ess_po.types import ESSStats


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype statistics and losses are computed in: float64 if any input is float64, else
    float32 (bfloat16 and float16 inputs are widened)."""
    wide = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if wide else torch.float32


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context with autocast disabled for ``device``'s type, so an ambient
    ``torch.autocast`` never changes what the loss computes (a no-op on device types without
    autocast, such as ``meta``)."""
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    # Entering and leaving an autocast context costs more than a small batch's arithmetic
    # operation; eager code skips it when autocast is off already (compiled code keeps it).
    if not torch.compiler.is_compiling() and not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def reduce_nonempty(x: torch.Tensor, op: str, dim: int | None, empty: float) -> torch.Tensor:
    """``x.amax``/``x.amin`` over ``dim`` (all of ``x`` for ``None``), ``empty`` where the reduced
    set is empty. torch refuses to reduce an empty dimension; the shape is metadata, so this
    branch costs nothing."""
    dim = None if dim is None else dim % max(x.dim(), 1)
    size = x.numel() if dim is None else x.shape[dim]
    if size == 0:
        shape = () if dim is None else x.shape[:dim] + x.shape[dim + 1 :]
        return x.new_full(shape, empty)
    return getattr(x, op)() if dim is None else getattr(x, op)(dim=dim)


def masked_stats(
    log_ratio: torch.Tensor, valid: torch.Tensor, dim: int | None
) -> tuple[ESSStats, torch.Tensor]:
    """Statistics of ``log_ratio`` (detached, compute dtype) at ``valid`` (bool) positions, and
    the shifted ratios ``exp(log_ratio - shift)`` (0 at masked positions).

    ``dim`` is ``None`` or a dimension. Masked positions may hold anything: they are replaced
    by ``-inf`` for the maximum and by 0 after the exponential. Shifting by the maximum makes
    every exponent <= 0: no overflow, and the largest term is 1. A NaN or ``+inf`` at a valid position makes
    the statistics NaN (never silently dropped).
    """
    dim = None if dim is None else dim % log_ratio.dim()
    masked = torch.where(valid, log_ratio, float("-inf"))
    shift = reduce_nonempty(masked, "amax", dim, float("-inf"))
    # Empty sets have a max of -inf: shift them by 0 so that exp(-inf - 0) = 0, not NaN.
    shift = torch.where(shift == float("-inf"), 0.0, shift)
    # exp of the -inf padding is several times slower than of a finite number on CPU, so the
    # exponent is formed from log_ratio itself and masked positions are zeroed after.
    e = torch.exp(log_ratio - (shift if dim is None else shift.unsqueeze(dim)))
    e = torch.where(valid, e, 0.0)
    count = valid.sum(dim=dim).to(log_ratio.dtype)
    # Sums of products, not dot/vecdot: those are on autocast's lower-precision list.
    s1, s2 = e.sum(dim=dim), (e * e).sum(dim=dim)
    # Empty sets have e == 0 everywhere, so their log-sums are already -inf.
    stats = ESSStats(torch.where(count > 0, shift, 0.0), torch.log(s1), torch.log(s2), count)
    return stats, e


def ess_stats(
    log_ratio: torch.Tensor, mask: torch.Tensor | None = None, *, dim: int | None = None
) -> ESSStats:
    """Log-space sufficient statistics of the ratios ``exp(log_ratio)`` at valid positions.

    Args:
        log_ratio: log importance ratios, e.g. ``logp_new - logp_old``, any shape, e.g. ``(B, T)``.
        mask: same shape, bool or 0/1. Masked positions may hold anything (``-inf``, NaN): they
            are never read. ``None`` means every *finite* position is valid: non-finite
            positions (NaN, ±inf) are dropped. With a mask, a NaN or inf at a valid position
            makes the statistics NaN.
        dim: reduce over this dimension only (``dim=-1`` gives per-sequence statistics of shape
            ``(B,)``); ``None`` reduces over everything.

    Returns:
        :class:`ESSStats` in float32 (float64 if ``log_ratio`` is float64), detached.

    Raises:
        TypeError: ``log_ratio`` or ``mask`` is not a tensor.
        ValueError: non-floating ``log_ratio``, a mask of another shape, ``dim`` out of range.

    Example:
        >>> import torch
        >>> lw = torch.tensor([[0.0, 0.0, 80.0], [0.0, 0.0, 0.0]])
        >>> ess_stats(lw, dim=-1).ess()
        tensor([0.3333, 1.0000])
    """
    check_tensor("log_ratio", log_ratio)
    if mask is not None:
        check_tensor("mask", mask, optional=True)
        if mask.shape != log_ratio.shape:
            raise ValueError(
                f"mask must have the shape of log_ratio {tuple(log_ratio.shape)}, got "
                f"{tuple(mask.shape)}."
            )
    if not log_ratio.is_floating_point():
        raise ValueError(
            f"log_ratio must be floating point, got dtype {log_ratio.dtype}; pass "
            f"log_ratio.float()."
        )
    dim = check_dim(dim, log_ratio)
    with torch.no_grad(), autocast_off(log_ratio.device):
        lw = log_ratio.to(compute_dtype(log_ratio))
        valid = torch.isfinite(lw) if mask is None else mask.bool()
        return masked_stats(lw, valid, dim)[0]


def _group_size(process_group: dist.ProcessGroup | None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def all_reduce_stats(stats: ESSStats, process_group: dist.ProcessGroup | None = None) -> ESSStats:
    """Combine batch-scope (0-dim) statistics over the ranks of ``process_group``, one all-reduce.

    Each rank writes its four statistics into its own row of a ``(world, 4)`` buffer of zeros; a
    sum all-reduce then gathers every rank's row, and a re-shifted log-sum-exp over rows combines
    them exactly. Ranks with no valid tokens contribute ``-inf`` sums, which combine as zero mass;
    they must still call this function (every rank joins the collective). A no-op when
    torch.distributed is not initialised or the group has one rank.

    Example:
        >>> import torch
        >>> s = ess_stats(torch.tensor([0.0, 1.0]))
        >>> all_reduce_stats(s) is s  # not distributed: unchanged
        True
    """
    world = _group_size(process_group)
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
    top = torch.where(top == float("-inf"), 0.0, top)
    delta = torch.where(nonempty, shift - top, 0.0)
    return ESSStats(
        top,
        torch.logsumexp(log_s1 + delta, dim=0),
        torch.logsumexp(log_s2 + 2.0 * delta, dim=0),
        count.sum(),
    )


def step_stats(
    parts: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    *,
    process_group: dist.ProcessGroup | None = None,
    sync: bool = True,
) -> ESSStats:
    r"""Batch statistics of a whole optimizer step: every micro-batch, every data-parallel rank.

    Merges :func:`ess_stats` of each ``(log_ratio, mask)`` pair (``(B_i, T_i)`` each, e.g.
    ``logp_new.detach() - logp_old`` of each gradient-accumulation micro-batch) and, with
    ``sync``, all-reduces the result over ``process_group`` (every rank must call it, also a rank
    without data: give it a ``(0, T)`` pair). Pass the result to every loss call of the step,
    ``ess_policy_loss(..., stats=step)``: each call then uses the ESS of the whole step, so the
    update no longer depends on how the step is split into micro-batches and ranks.

    The log ratios must come from the policy the step's losses are computed with (the current
    parameters, before the step's first update), for instance from a no-grad forward pass over
    the step's micro-batches, or the recomputed old log-probs on the first step after a rollout.

    Raises:
        ValueError: ``parts`` is empty.

    Example:
        >>> import torch
        >>> a, b = torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 0.0]])
        >>> step = step_stats([(a, None), (b, None)])
        >>> torch.allclose(step.ess(), ess_stats(torch.cat([a, b])).ess())
        True
    """
    merged: ESSStats | None = None
    for log_ratio, mask in parts:
        s = ess_stats(log_ratio, mask)
        merged = s if merged is None else merged.merge(s)
    if merged is None:
        raise ValueError(
            "step_stats got no (log_ratio, mask) pairs; pass at least one, e.g. a (0, T) tensor "
            "pair on a rank without data (every rank must join the all-reduce)."
        )
    return all_reduce_stats(merged, process_group) if sync else merged


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
        Detached tensor in ``[1/n, 1]``, float32 (float64 for float64 input); 1 where there are
        no valid tokens.

    Raises:
        TypeError: ``log_ratio`` or ``mask`` is not a tensor.
        ValueError: see :func:`ess_stats`.

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
