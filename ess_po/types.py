r"""The shared vocabulary of ess-po: option literals, the ESS statistics and the result type.

Every module imports these names from here (the core, the adapters, the benchmarks), so each
concept has one name and one set of values.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import torch

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum"]
"""How per-token losses become a scalar. ``"token-mean"``: sum over valid tokens / their number
(or ``normalizer``); ``"seq-mean-token-mean"``: mean over sequences of each sequence's token
mean; ``"seq-mean-token-sum"``: mean over sequences of each sequence's token sum;
``"token-sum"``: plain sum. Fully masked sequences are not counted by the seq-mean modes."""

ESSScope = Literal["call", "step", "sequence"]
"""The tokens one ESS is computed over. ``"call"``: the valid tokens of one loss call (a
micro-batch), all-reduced over data-parallel ranks, as the authors' reference code does;
``"step"``: the whole optimizer step (every micro-batch, every rank), from precomputed
statistics (:func:`ess_po.step_stats`); ``"sequence"``: each sequence its own ESS."""

AGG_MODES: tuple[str, ...] = get_args(AggMode)
ESS_SCOPES: tuple[str, ...] = get_args(ESSScope)


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

    All fields have the same shape: ``()`` for a batch, ``(B,)`` per sequence. Pass batch
    statistics (``()``) to :func:`ess_po.ess_policy_loss` as ``stats=`` to use an ESS computed
    over more tokens than the call holds (the step scope, see :func:`step_stats`).
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
        # Clamp away rounding outside the mathematical range (NaN stays NaN); n = 0 means
        # "nothing to correct".
        raw = torch.minimum(torch.maximum(raw, -log_n), torch.zeros_like(raw))
        return torch.where(n > 0, raw, torch.zeros_like(raw))

    def ess(self) -> torch.Tensor:
        """The normalized effective sample size, in ``[1/n, 1]``."""
        return self.log_ess().exp()


class ESSLossOutput(NamedTuple):
    r"""The ESS loss and its diagnostics: the result of :func:`ess_po.ess_policy_loss` (scalar
    ``loss``, ``policy_loss``, ``regularizer_loss``) and of :func:`ess_po.ess_token_loss`
    (the same three as ``(B, T)`` per-token terms, 0 at masked positions).

    Diagnostics are detached 0-dim float32 tensors, local to the call except ``ess``. New fields
    are appended, so positional unpacking of older ones keeps working.

    Attributes:
        loss: the objective, ``policy_loss + regularizer_loss``.
        ess: the ESS used (``"sequence"`` scope: mean over non-empty sequences).
        ess_min: smallest per-sequence ESS (equals ``ess`` otherwise).
        capped_frac: fraction of valid tokens whose ratio exceeds ESS (weight capped to ESS);
            ratios a rounding step above ESS count, see ``capped_mass``.
        kl_behavior: mean over valid tokens of :math:`k_3(d)`, the regulariser's divergence
            estimate between the current and the behaviour policy.
        ratio_mean: mean ratio :math:`w` over valid tokens.
        ratio_max: largest ratio (saturates at float32's largest number).
        policy_loss: the policy term :math:`-\rho\, c\, A \log\pi_\theta`.
        regularizer_loss: the regulariser term :math:`(1 - \mathrm{ESS})\, k_3(d)`.
        num_tokens: number of valid tokens in this call.
        capped_mass: share of the ratio mass the cap removes, :math:`\sum (w - \rho) / \sum w`.
        ratio_min: smallest ratio: how far into the regulariser's tail the batch reaches.
    """

    loss: torch.Tensor
    ess: torch.Tensor
    ess_min: torch.Tensor
    capped_frac: torch.Tensor
    kl_behavior: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_max: torch.Tensor
    policy_loss: torch.Tensor
    regularizer_loss: torch.Tensor
    num_tokens: torch.Tensor
    capped_mass: torch.Tensor
    ratio_min: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor]:
        """The 0-dim diagnostics (every field but ``loss``, ``num_tokens`` and per-token terms),
        with no host synchronisation: convert to floats once, where the framework logs."""
        return {
            name: value
            for name, value in zip(self._fields, self, strict=True)
            if name not in ("loss", "num_tokens") and value.dim() == 0
        }
