r"""The fused implementation of the per-token ESS objective (issue 24).

Same semantics as the plain-autograd reference (``ess_po.objective._token_terms_reference``),
computed in fewer passes over the ``(B, T)`` tokens; :data:`ENABLED` chooses between them.

* The forward runs without autograd, in a few reused buffers (fresh ``(B, T)`` tensors cost
  allocator work and page faults on the CPU): the mask becomes a 0/1 float once (a bool,
  integer or float mask alike), masked positions are zeroed *before any arithmetic*, then the
  maximum, the two shifted ESS sums and the per-token terms and diagnostics, with three
  transcendental functions per token: the statistics' ``exp(d - max)``, the capped ratio
  ``exp(min(d, log ESS))`` (two passes; recovering it from the regulariser's ``expm1`` took
  three) and the regulariser's ``expm1``.
* The backward is one elementwise multiply-add,
  :math:`g_\text{pol}\, w_1 - g_\text{reg}\,(1-\mathrm{ESS})\,\mathrm{em}`, with the saved
  :math:`w_1 = -\rho\, c\, A` and :math:`\mathrm{em} = e^{-\max(d, -L)} - 1` (both exactly 0 at
  masked positions), in the compute dtype, cast to ``logp_new``'s dtype (an fp16 overflow is
  inf). Under ``create_graph`` it recomputes the gradient with differentiable operations from
  the saved inputs, so second derivatives are the reference's, :math:`(1-\mathrm{ESS})\,
  e^{-d}` on the diagonal above the tail and 0 below it.
* :func:`ess_po.ess_policy_loss`'s token modes (token-mean, token-sum) take the two sums over
  the tokens directly (``_ESSSums``: a dot product for the policy term, and the ``sum k3`` the
  diagnostics need anyway for the regulariser), divided by the normaliser inside the same
  autograd node: no ``(B, T)`` loss, policy or regulariser terms are formed, and the backward
  is one multiplication of the 0-dim upstream gradient by the direction
  :math:`w_1 - (1-\mathrm{ESS})\,\mathrm{em}`, precomputed in the forward.

Masking without ``torch.where`` in eager mode: on the CPU a boolean select costs about twenty
arithmetic passes, and a multiplication by a 0/1 mask lets ``0 * NaN`` through. Masked positions
are zeroed with a bitwise AND of the values' bits and an all-ones/all-zeros integer mask: exactly
``torch.where(valid, x, 0)`` (a NaN or inf at a valid position passes unchanged), at the cost of
an addition. Under ``torch.compile`` (where selects fuse for free) the same functions use
``torch.where``; the results are the same bits.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from ess_po.ess import _group_size, all_reduce_stats, reduce_nonempty
from ess_po.types import ESSLossOutput, ESSStats

#: What the summed terms are divided by: nothing (``None``), a Python number (also symbolic,
#: under ``torch.compile``) or a 0-dim tensor.
Divisor = float | int | torch.SymInt | torch.SymFloat | torch.Tensor | None

# Masked positions read as this log ratio in the maximum (and its negative in the minimum):
# an addition of 0 at valid positions (exact, NaN and inf pass), and finite, so no exp of -inf
# (several times slower than of a finite number on the CPU) is ever formed.
_PAD = 1e30
_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64}

#: Whether the loss (``ess_po.objective._token_terms``) runs the fused passes; ``False`` runs
#: the plain-autograd reference implementation (``_token_terms_reference``). The statistics
#: pre-pass of the step scope (``ess_po.step_stats``) keeps its plain implementation: the fused
#: statistics measured no faster there (``benchmarks/loss_cost.py``, ``step-stats-fused``).
ENABLED: bool = True


class _Mask:
    """The mask in the three forms the passes need, each built once per call: ``valid`` (bool),
    ``maskf`` (0/1 in the compute dtype) and ``bits`` (0 / all-ones integers of the compute
    dtype's width; ``None`` when compiling)."""

    def __init__(self, mask: torch.Tensor, cdtype: torch.dtype, compiling: bool) -> None:
        self.compiling = compiling
        # valid = mask != 0: NaN counts as valid (NaN != 0), -0.0 does not.
        self.valid = mask if mask.dtype == torch.bool else mask != 0
        if compiling:
            self.maskf = self.valid.to(cdtype)
            self.bits = None
            return
        # bool -> float is an unvectorised loop on the CPU; uint8 -> float is not.
        u8 = self.valid.view(torch.uint8)
        self.maskf = u8.to(cdtype)
        self.bits = u8.to(_INT_OF[cdtype]).neg_()

    def keep(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``torch.where(valid, x, 0)`` (``x`` in the compute dtype); in place when ``inplace``
        (``x`` is then a fresh buffer of this call)."""
        if self.bits is None:
            return torch.where(self.valid, x, 0.0)
        xi = x.view(self.bits.dtype)
        if inplace:
            xi.bitwise_and_(self.bits)
            return x
        return torch.bitwise_and(xi, self.bits).view(x.dtype)


@torch.library.custom_op("ess_po::materialized", mutates_args=())
def _materialized(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` that compiled graphs cannot see through (used only under
    ``torch.compile``, for a non-bool mask on the CPU).

    AOTAutograd's partitioner may recompute any pointwise value in the backward from the cheapest
    tensors to save. For ``w1`` that is the bool ``mask != 0`` (1 byte a token), which the
    forward would then write out; Inductor's CPU code stores and loads 1-byte masks several
    times slower than floats (the benchmarks page: float masks compiled at up to 20x compiled
    REINFORCE before this copy, 1.7-3.6x with it). A custom op is not on the partitioner's
    recompute list, so ``w1`` (float) is saved instead and the backward reads no mask at all. A
    bool mask is an input, saved at no cost, so it keeps the plain path. Other devices keep it
    too: the slow 1-byte stores were measured on the CPU only (no GPU was available), and there
    the copy would be one more pass for nothing.
    """
    return x.clone()


@_materialized.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def fused_stats(
    d: torch.Tensor, m: _Mask, dim: int | None, need_low: bool = True
) -> tuple[_Raw, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Statistics of the sanitised log ratios ``d`` (0 at masked positions) in linear units
    (:class:`_Raw`), the shifted ratios ``exp(d - top)`` (0 at masked positions), the smallest
    valid log ratio (``+_PAD`` where there is none, over everything) and a free scratch buffer
    of ``d``'s shape.

    In eager mode the passes write into buffers of this call (``out=``): fresh ``(B, T)``
    tensors cost allocator work and page faults comparable to an arithmetic pass on the CPU.
    Compiled, plain operations (Inductor plans the memory)."""
    maskf, eager = m.maskf, not m.compiling
    pad = torch.sub(maskf, 1.0).mul_(_PAD)  # 0 at valid positions, -1e30 at masked ones
    scratch = torch.add(d, pad)
    if dim is None:
        count = maskf.sum()
        # -_PAD where there are no valid tokens (finite: exp(d - top) below is then exp(0),
        # zeroed); torch refuses to reduce an empty tensor, hence the shape test (metadata).
        top = scratch.amax() if d.numel() else d.new_full((), -_PAD)
    else:
        count = maskf.sum(dim=dim)
        top = reduce_nonempty(scratch, "amax", dim, -_PAD)
    low = None
    if need_low:
        low = torch.sub(d, pad, out=scratch if eager else None)
        low = low.amin() if d.numel() else d.new_full((), _PAD)
    top_b = top if dim is None else top.unsqueeze(dim)
    shifted = torch.sub(d, top_b, out=pad if eager else None)
    # exp(d - top) <= 1 at valid positions, exactly 1 at the largest; masked ones are zeroed.
    e = shifted.clamp_(max=0.0).exp_().mul_(maskf)
    if dim is not None:
        return _Raw(top, count, e.sum(dim=dim), (e * e).sum(dim=dim)), e, low, scratch
    s1 = e.sum()
    if eager and e.is_contiguous():
        flat = e.view(-1)
        s2 = torch.dot(flat, flat)  # autocast is off here
    else:
        s2 = (e * e).sum()
    return _Raw(top, count, s1, s2), e, low, scratch


class _Raw(NamedTuple):
    """The statistics in linear units: ``top`` (the largest valid log ratio, ``-_PAD`` with no
    valid tokens), the ``count`` of valid tokens and the sums ``s1``, ``s2`` of ``exp(d - top)``
    and its square. Where there are tokens, ``s1, s2 >= 1`` (the largest term is exactly 1)."""

    top: torch.Tensor
    count: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor

    def log_space(self) -> ESSStats:
        """As :class:`ESSStats` (shift 0 where there are no tokens)."""
        shift = torch.where(self.count > 0, self.top, 0.0)
        return ESSStats(shift, torch.log(self.s1), torch.log(self.s2), self.count)


def _linear_ess(raw: _Raw, s1: torch.Tensor, n1: torch.Tensor, inv_n: torch.Tensor) -> torch.Tensor:
    """:meth:`ESSStats.ess` of one group of tokens, ``s1^2 / (n s2)`` clamped to ``[1/n, 1]``
    (1 with no tokens, NaN stays NaN): no logarithms, which the statistics of one call do not
    need (``s1, s2 >= 1`` where there are tokens, ``<= n``, so nothing overflows). ``s1`` is
    ``raw.s1`` clamped to at least 1 (1 with no tokens, where ``s2 = 0`` makes the quotient
    inf, clamped to 1). Equal ratios give exactly 1: every shifted ratio is 1, so
    ``s1 = s2 = n`` and the two products round alike."""
    ess = torch.mul(s1, s1).div_(torch.mul(raw.s2, n1)).clamp_(max=1.0)
    return torch.maximum(ess, inv_n)


def _broadcast_small(g: torch.Tensor) -> torch.Tensor:
    """``g`` with its stride-0 (expanded) dimensions as size 1: the same values, broadcast."""
    if g.numel() == 0 or all(s != 0 for s in g.stride()):
        return g
    shape = [1 if st == 0 else n for n, st in zip(g.shape, g.stride(), strict=True)]
    return g.as_strided(shape, g.stride(), g.storage_offset())


def _divide(x: torch.Tensor, divisor: Divisor) -> torch.Tensor:
    return x if divisor is None else x / divisor


class _ESSTerms(torch.autograd.Function):
    """The ``(B, T)`` loss, policy and regulariser terms from the tensors of the no-grad
    passes, with the closed-form gradient (:func:`ess_po.ess_token_loss`).

    Inputs: ``logp_new`` (the only differentiable one; its values are not read), the sanitised
    ``lp``, ``w1 = -rho c A`` and ``em`` (0 at masked positions), ``k3``, ``1 - ESS``, and what
    a double backward needs to recompute ``d``: ``logp_old``, the mask and the tail."""

    @staticmethod
    def forward(ctx, logp_new, lp, w1, em, k3, one_minus_ess, logp_old, mask, tail):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logp_new, w1, em, one_minus_ess, logp_old, mask)
        ctx.tail = tail
        return _terms(lp, w1, k3, one_minus_ess)

    @staticmethod
    def backward(ctx, g_loss, g_pol, g_reg):  # type: ignore[override]
        if g_loss is not None:
            g_pol = g_loss if g_pol is None else g_pol + g_loss
            g_reg = g_loss if g_reg is None else g_reg + g_loss
        if g_pol is None and g_reg is None:
            return (None,) * 9
        return (_grad(ctx.tail, ctx.saved_tensors, g_pol, g_reg),) + (None,) * 8


class _ESSSums(torch.autograd.Function):
    r"""The token modes' scalar loss, ``(sum(w1 lp) + sum((1 - ESS) k3)) / divisor``, and its
    policy and regulariser parts (values only, not differentiable), with the closed-form
    gradient :math:`g_t / \text{divisor}`, ``grad_dir`` :math:`= w_1 - (1 - \mathrm{ESS})\,
    \mathrm{em}` precomputed in the forward: the backward is one multiplication.

    Inputs: ``logp_new`` (the only differentiable one; its values are not read), the sanitised
    ``lp``, ``w1`` and ``grad_dir`` (0 at masked positions), ``k3`` (its sum over the tokens
    one ESS covers), ``1 - ESS`` (NaN as 0), what a double backward
    needs to recompute ``d`` (``logp_old``, the mask and the tail) and ``divisor`` (``None``, a
    number or a 0-dim tensor in the compute dtype)."""

    @staticmethod
    def forward(ctx, logp_new, lp, w1, grad_dir, k3, one_minus_ess, logp_old, mask, tail, divisor):  # type: ignore[override]
        ctx.set_materialize_grads(False)  # no zero tensors for the non-differentiable outputs
        tensor_divisor = isinstance(divisor, torch.Tensor)
        saved = (logp_new, grad_dir, one_minus_ess, logp_old, mask)
        ctx.save_for_backward(*saved, *((divisor,) if tensor_divisor else ()))
        ctx.tail, ctx.divisor = tail, None if tensor_divisor else divisor
        loss, policy, regularizer = _sums(lp, w1, k3, one_minus_ess, divisor)
        ctx.mark_non_differentiable(policy, regularizer)
        return loss, policy, regularizer

    @staticmethod
    def backward(ctx, g_loss, _g_pol, _g_reg):  # type: ignore[override]
        if g_loss is None:  # an undefined gradient (gradcheck's check_undefined_grad passes one)
            return (None,) * 10
        logp_new, grad_dir, one_minus_ess, logp_old, mask, *divisor = ctx.saved_tensors
        g = _divide(g_loss, divisor[0] if divisor else ctx.divisor)
        if torch.is_grad_enabled():
            # create_graph: the second derivative (1 - ESS) e^{-d} through a differentiable em
            # whose value cancels exactly, so the gradient's value is grad_dir * g as below.
            em = _em(logp_new, logp_old, mask, grad_dir.dtype, ctx.tail)
            grad = grad_dir * g - (em - em.detach()) * (g * one_minus_ess)
        else:
            grad = grad_dir * g
        return (grad.to(logp_new.dtype),) + (None,) * 9


def _em(logp_new, logp_old, mask, dtype: torch.dtype, tail: float) -> torch.Tensor:
    """``em = e^{-max(d, -L)} - 1`` from differentiable operations on ``logp_new`` (0 where
    masked): a double backward's path, whose derivative is :math:`-e^{-d}` above the tail."""
    valid = mask if mask.dtype == torch.bool else mask != 0
    lp = torch.where(valid, logp_new.to(dtype), 0.0)
    lo = torch.where(valid, logp_old.detach().to(dtype), 0.0)
    return torch.expm1(-torch.clamp(lp - lo, min=-tail))


def _grad(
    tail: float, saved: tuple, g_pol: torch.Tensor | None, g_reg: torch.Tensor | None
) -> torch.Tensor:
    """``logp_new``'s gradient from the upstream gradients of the policy and regulariser terms
    (``(B, T)`` or broadcast; ``None`` where a term is unused, not both)."""
    logp_new, w1, em, one_minus_ess, logp_old, mask = saved
    if torch.is_grad_enabled():
        # create_graph: the same gradient from differentiable operations on logp_new, so
        # the second derivative is (1 - ESS) e^{-d} (0 below the tail and where masked).
        em = _em(logp_new, logp_old, mask, w1.dtype, tail)
        grad = 0.0
        if g_pol is not None:
            grad = grad + w1 * g_pol
        if g_reg is not None:
            grad = grad - em * (g_reg * one_minus_ess)
        return grad.to(logp_new.dtype)
    if g_pol is None:
        return torch.mul(em, g_reg * one_minus_ess.neg()).to(logp_new.dtype)
    if g_reg is None:
        return torch.mul(w1, _broadcast_small(g_pol)).to(logp_new.dtype)
    # A NaN ESS (a NaN at a valid position) already makes w1 NaN at every valid position;
    # its 0 here keeps masked positions at an exact 0 (em = 0 there), as the reference.
    coef = torch.mul(_broadcast_small(g_reg), one_minus_ess).nan_to_num_(nan=0.0)
    grad = torch.mul(w1, _broadcast_small(g_pol)).addcmul_(em, coef, value=-1.0)
    return grad.to(logp_new.dtype)


def _terms(lp, w1, k3, one_minus_ess):
    policy = w1 * lp
    regularizer = k3 * one_minus_ess
    return policy + regularizer, policy, regularizer


def _sums(lp, w1, k3_sum, one_minus_ess, divisor):
    """The sums of :func:`_terms`' three terms divided by ``divisor``: ``sum(w1 lp)`` and
    ``sum((1 - ESS) k3_sum)``, with no ``(B, T)`` product left behind; ``k3_sum`` is the sum of
    ``k3`` over the tokens one ESS covers (0-dim, or ``(B, 1)`` per sequence)."""
    if torch.compiler.is_compiling():
        # Per row, then over rows: Inductor then fuses the sum into the loop that forms w1 (over
        # rows, for the advantages) instead of writing w1 out and reading it back for a flat
        # sum (64x4096 bool, compiled: 2.8 -> 2.5 ms).
        policy = (w1 * lp).sum(dim=-1).sum()
    elif not (w1.is_contiguous() and lp.is_contiguous()):
        policy = (w1 * lp).sum()
    else:
        policy = torch.dot(w1.reshape(-1), lp.reshape(-1))  # autocast is off here
    regularizer = k3_sum * one_minus_ess
    if regularizer.dim() != 0:
        regularizer = regularizer.sum()
    policy, regularizer = _divide(policy, divisor), _divide(regularizer, divisor)
    return policy + regularizer, policy, regularizer


def fused_token_terms(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    per_sequence: bool,
    rollout_weights: torch.Tensor | None,
    process_group: dist.ProcessGroup | None,
    sync_ess: bool,
    stats: ESSStats | None,
    cdtype: torch.dtype,
    tail: float,
    sums: bool = False,
    divisor: Divisor | str = None,
) -> ESSLossOutput:
    """``_token_terms`` of :mod:`ess_po.objective` in the fused passes (see the module doc);
    with ``sums``, ``loss``, ``policy_loss`` and ``regularizer_loss`` are the 0-dim sums over the
    tokens divided by ``divisor`` (``None``: not divided; ``"count"``: the valid tokens, at
    least 1) instead of ``(B, T)`` terms."""
    compiling = torch.compiler.is_compiling()
    eager = not compiling  # out= buffers of this call, see fused_stats
    needs_grad = logp_new.requires_grad and torch.is_grad_enabled()
    with torch.no_grad():
        m = _Mask(mask, cdtype, compiling)
        dim = -1 if per_sequence else None
        # Sanitise first: masked positions hold 0 from here on, whatever they held. (No detach:
        # nothing here records a gradient.)
        lp = m.keep(logp_new.to(cdtype), inplace=logp_new.dtype != cdtype)
        d = m.keep(logp_old.to(cdtype), inplace=logp_old.dtype != cdtype)
        d = torch.sub(lp, d, out=d if eager else None)  # d: a buffer of this call
        raw, e, low, scratch = fused_stats(d, m, dim)
        top = raw.top.unsqueeze(-1) if per_sequence else raw.top
        if per_sequence:
            local = raw.log_space()
            log_ess = local.log_ess().unsqueeze(-1)
            ess = log_ess.exp()
            one_minus_ess = -torch.expm1(log_ess)
        else:
            n1 = raw.count.clamp(min=1.0)
            inv_n = n1.reciprocal()
            # s1 >= 1 where there are tokens (the largest shifted ratio is exactly 1); with none
            # s1 = 0, and 1 gives ESS 1, the mean ratio 1 and the capped mass 0 (excess is 0).
            s1c = raw.s1.clamp(min=1.0)
            if stats is None and (not sync_ess or _group_size(process_group) == 1):
                # One group of tokens: the ESS in linear units, no log-space statistics.
                ess = _linear_ess(raw, s1c, n1, inv_n)
                log_ess = torch.log(ess)
                one_minus_ess = torch.rsub(ess, 1.0)
            else:
                if stats is not None:
                    log_ess = stats.log_ess().to(cdtype)
                else:
                    log_ess = all_reduce_stats(raw.log_space(), process_group).log_ess()
                ess = log_ess.exp()
                one_minus_ess = -torch.expm1(log_ess)

        # Capped tokens and the ratio mass the cap removes, in shifted units: relu(e - cap)
        # (0 at masked positions, where e = 0), then e > cap counts the tokens (NaN compares
        # false: not capped), as 0/1 floats into the same buffer (count_nonzero measured several
        # times slower on the CPU).
        cap = torch.exp(log_ess - top)
        over = torch.sub(e, cap, out=scratch if eager else None).relu_()
        excess = over.sum(dim=-1) if per_sequence else over.sum()
        capped = torch.gt(e, cap, out=over if eager else None).sum()

        # rho = min(w, ESS) = exp(min(d, log ESS)) (ESS where masked, zeroed below), before d
        # becomes the regulariser's tail below.
        rho = torch.clamp(d, max=log_ess, out=e if eager else None).exp_()

        # k3(d) = d + expm1(-d), continued by its tangent below -L, k3(-L) + (1 - e^L)(d + L):
        # with dc = max(d, -L) and em = expm1(-dc), k3 = dc + em + (1 - e^L) min(d + L, 0),
        # the tail term exactly 0 above -L. (Not dc - d for the tail: inf - inf at d = +inf.)
        dc = torch.clamp(d, min=-tail, out=scratch if eager else None)
        em = torch.neg(dc).expm1_()  # e^{-dc} - 1 = -k3'(d); 0 at masked positions
        k3 = torch.add(d, tail, out=d if eager else None).clamp_(max=0.0)
        k3 = torch.add(dc, k3, alpha=-math.expm1(tail), out=k3 if eager else None).add_(em)
        # One pass over k3: per row when the sums need one regulariser per sequence's ESS, and
        # under compile, where a per-row sum shares the loop (and the expm1) that forms the
        # gradient's direction; a flat sum is fused into the first pass instead, and the expm1
        # computed twice (64x4096 and 256x4096 bool, compiled: 2.0-2.6x -> 1.8-1.9x REINFORCE).
        k3_rows = k3.sum(dim=-1, keepdim=True) if (sums and per_sequence) or compiling else None
        k3_sum = k3.sum() if k3_rows is None else k3_rows.sum()

        adv = advantages.to(cdtype)
        adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
        w1 = rho.mul_(adv.neg())
        if rollout_weights is not None:
            w1.mul_(rollout_weights.to(cdtype))
        w1 = m.keep(w1, inplace=True)  # -rho c A, exactly 0 at masked positions
        saved = w1
        if sums and needs_grad:
            # The gradient's direction, w1 - (1 - ESS) em, into em's buffer (the sums no longer
            # need em). A NaN ESS already makes w1 NaN at every valid position; its 0 here keeps
            # masked positions at an exact 0, as the reference. The regulariser's sum is the
            # same with it: a NaN ESS comes from a NaN or +inf log ratio at a valid position,
            # which makes k3's sum NaN or +inf, and either times 0 is NaN.
            one_minus_ess = one_minus_ess.nan_to_num(nan=0.0)
            em = saved = torch.addcmul(w1, em, one_minus_ess, value=-1.0, out=em if eager else None)
        if needs_grad and compiling and mask.dtype != torch.bool and mask.device.type == "cpu":
            saved = _materialized(saved)
            em, w1 = (saved, w1) if sums else (em, saved)

        if per_sequence:
            diagnostics = _sequence_diagnostics(local, low, excess, capped, k3_sum, ess)
            n1 = local.count.sum().clamp(min=1.0)
        else:
            diagnostics = _batch_diagnostics(raw, s1c, n1, low, excess, capped, k3_sum, ess)
        if isinstance(divisor, str):  # "count"
            divisor = n1
        elif isinstance(divisor, torch.Tensor) and divisor.dtype != cdtype:
            divisor = divisor.to(cdtype)

    if sums:  # the regulariser needs only the sum of k3 over the tokens one ESS covers
        k3 = k3_rows if per_sequence else k3_sum
    if needs_grad and sums:
        loss, policy, regularizer = _ESSSums.apply(
            logp_new, lp, w1, em, k3, one_minus_ess, logp_old, mask, tail, divisor
        )
    elif needs_grad:
        loss, policy, regularizer = _ESSTerms.apply(
            logp_new, lp, w1, em, k3, one_minus_ess, logp_old, mask, tail
        )
    elif sums:
        loss, policy, regularizer = _sums(lp, w1, k3, one_minus_ess, divisor)
    else:
        loss, policy, regularizer = _terms(lp, w1, k3, one_minus_ess)
    ess_mean, ess_min, capped_frac, capped_mass, kl, r_mean, r_max, r_min, n = diagnostics
    return ESSLossOutput(
        loss, ess_mean, ess_min, capped_frac, kl, r_mean, r_max, policy, regularizer, n,
        capped_mass, r_min,
    )  # fmt: skip


_FMAX = torch.finfo(torch.float32).max  # ratios beyond float32's range are reported saturated


def _sequence_diagnostics(
    local: ESSStats,
    low: torch.Tensor,
    excess: torch.Tensor,
    capped: torch.Tensor,
    k3_sum: torch.Tensor,
    ess: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """The reference's diagnostics (``ess_po.objective._diagnostics``) in sequence scope, from
    the reductions of the fused passes."""
    from ess_po.objective import _combine_shifted, ess_summary  # objective imports this module

    n = local.count.sum()
    n_safe = n.clamp(min=1.0)
    has_tokens = n > 0
    ess_mean, ess_min, log_sum_w = ess_summary(local, ess, True)
    shift_max = reduce_nonempty(
        torch.where(local.count > 0, local.shift, float("-inf")), "amax", None, 0.0
    )
    ratio_max = torch.where(has_tokens, torch.exp(shift_max), 1.0)
    ratio_mean = torch.where(has_tokens, torch.exp(log_sum_w - torch.log(n_safe)), 1.0)
    values = (
        ess_mean,
        ess_min,
        capped / n_safe,
        _combine_shifted(local, excess),
        k3_sum / n_safe,
        ratio_mean.clamp(max=_FMAX),
        ratio_max.clamp(max=_FMAX),
        torch.where(has_tokens, torch.exp(low), 1.0),
        n,
    )
    return tuple(v.reshape(()).to(torch.float32) for v in values)


def _batch_diagnostics(
    raw: _Raw,
    s1: torch.Tensor,
    n1: torch.Tensor,
    low: torch.Tensor,
    excess: torch.Tensor,
    capped: torch.Tensor,
    k3_sum: torch.Tensor,
    ess: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """The reference's diagnostics for one group of tokens (call and step scope), where its
    reductions over groups collapse, from the linear statistics: few scalar operations, which
    is what a small batch's time goes on (``benchmarks/loss_cost.py``). ``s1`` and ``n1`` are
    the shifted sum of ratios and the count, each at least 1 (both 1 with no tokens, so the
    mean ratio is then 1)."""
    has_tokens = raw.count.clamp(max=1.0)  # 1 where there are tokens, else 0
    # With no tokens top is -_PAD and low +_PAD; times 0 they are 0, so exp gives 1.
    shift = raw.top * has_tokens
    ratio_max = torch.exp(shift).clamp_(max=_FMAX)
    ratio_min = torch.exp(low * has_tokens)
    # log(s1 / n) + shift: the mean ratio without overflow when the largest ratio is beyond
    # float32 but the mean is not.
    ratio_mean = torch.exp(torch.log(s1 / n1) + shift)
    # excess and s1 are in the same shifted units; NaN statistics report 0, as the reference.
    capped_mass = torch.div(excess, s1).nan_to_num_(nan=0.0)
    values = (
        ess,
        ess,
        capped / n1,
        capped_mass,
        k3_sum / n1,
        ratio_mean.clamp_(max=_FMAX),
        ratio_max,
        ratio_min,
        raw.count,
    )
    if ess.dtype == torch.float32:
        return values
    return tuple(v.float() for v in values)
