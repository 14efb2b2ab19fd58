r"""The ESS objective as an AReaL actor loss: ``loss_fn(logprobs, entropy, input_data, **kw)``.

AReaL's FSDP engine calls the loss once per packed micro-batch: ``logprobs`` is ``(N,)`` (the
micro-batch's sequences concatenated, ``input_data["cu_seqlens"]`` marks their starts) and the
per-token inputs of ``input_data`` are ``(N,)`` too. With ``d = logprobs - input_data["logprobs"]``
(the behaviour log-probs) on the tokens of ``input_data["loss_mask"]``:

.. math::

    \ell_t = -\mathrm{sg}\big(\min(w_t, \mathrm{ESS})\big)\, A_t \log\pi_\theta(t)
        + (1 - \mathrm{ESS})\,(d_t + e^{-d_t} - 1), \qquad
    \mathrm{loss} = \frac{\sum_{t \in \mathrm{mb}} \ell_t}{n_{\mathrm{mb}}}

The engine multiplies the loss by ``n_mb / n_step`` (``loss_weight_fn``: the micro-batch's valid
tokens over the step's, summed over data-parallel ranks), so the step's gradient is that of the
token mean over the whole step, as for AReaL's own loss. The packed tensors are viewed as one
``(1, N)`` row; nothing is unpacked or copied.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Final

import torch
from areal.utils import stats_tracker
from areal.utils.stats_tracker import ReduceType

from ess_po import ESSStats, ess_token_loss

__all__ = ["ESS_METRICS", "ESSLoss"]

#: The core diagnostics logged in AReaL's stats tracker (``<scope>/ess``...), each broadcast
#: over the call's valid tokens with the reduction AReaL applies at export: a token-weighted
#: mean over the step (``"avg"``), or the step's smallest / largest value.
ESS_METRICS: Final = {
    "ess": ("ess", "avg"),
    "ess_min": ("ess_min", "min"),
    "capped_frac": ("ess_capped_frac", "avg"),
    "capped_mass": ("ess_capped_mass", "avg"),
    "kl_behavior": ("ess_kl_behavior", "avg"),
    "ratio_mean": ("ess_ratio_mean", "avg"),
    "ratio_max": ("ess_ratio_max", "max"),
    "ratio_min": ("ess_ratio_min", "min"),
}

#: ``input_data`` keys of AReaL's loss that the ESS objective does not use (warned once).
_UNUSED_INPUTS: Final = {
    "teacher_logp": "the distillation term (teacher_logp) of AReaL's GRPO loss is not added",
}


class ESSLoss:
    """One optimizer step's AReaL loss function (built by
    :class:`~ess_po.integrations.areal.ESSPPOActor` for each ``engine.train_batch``).

    Args:
        ess_scope: ``"step"`` (``stats`` must be given) or ``"call"``.
        stats: the step's ESS statistics (:func:`ess_po.step_stats`), or ``None``.
        free: whether ``stats`` came from the free path.
        current_version: the engine's policy version, for the staleness metrics.
        check_values: the core's host-syncing value checks.
        warned: the set of warnings already given (owned by the actor: each is given once).
    """

    def __init__(
        self,
        ess_scope: str,
        stats: ESSStats | None = None,
        *,
        free: bool = False,
        current_version: int | None = None,
        check_values: bool = False,
        warned: set[str] | None = None,
    ) -> None:
        if ess_scope == "step" and stats is None:
            raise ValueError(
                "ESSLoss(ess_scope='step') needs the step's statistics (stats=...); "
                "ESSPPOActor computes them before each engine.train_batch."
            )
        self.ess_scope = ess_scope
        self.stats = stats
        self.free = free
        self.current_version = current_version
        self.check_values = check_values
        self.warned = warned if warned is not None else set()

    def __call__(
        self,
        logprobs: torch.Tensor,
        entropy: torch.Tensor,
        input_data: Mapping[str, Any],
        **kwargs: Any,
    ) -> torch.Tensor:
        """The micro-batch loss (0-dim, float32): the token mean of the ESS objective."""
        for key, what in _UNUSED_INPUTS.items():
            if input_data.get(key) is not None and key not in self.warned:
                self.warned.add(key)
                warnings.warn(f"ESS objective: {what}.", UserWarning, stacklevel=2)
        mask = input_data["loss_mask"]
        row = (1, -1)  # the packed micro-batch as one (1, N) row: views, no copies
        token = ess_token_loss(
            logprobs.view(row),
            input_data["logprobs"].view(row),
            input_data["advantages"].view(row),
            mask.view(row),
            ess_scope=self.ess_scope,
            stats=self.stats,
            sync_ess=False,  # "call": this rank's micro-batch (AReaL may skip a call on a rank)
            check_values=self.check_values,
        )
        valid = mask if mask.dtype == torch.bool else mask != 0
        loss = token.loss.sum() / token.num_tokens.clamp(min=1.0)
        self._log(token, logprobs, entropy, input_data, valid)
        return loss

    def _log(
        self,
        token: Any,
        logprobs: torch.Tensor,
        entropy: torch.Tensor,
        input_data: Mapping[str, Any],
        valid: torch.Tensor,
    ) -> None:
        """AReaL's per-token statistics (its names, its ``n_valid_tokens`` denominator) and the
        ESS diagnostics; tensors only, reduced by the tracker at export (no host sync here)."""
        reduce = {"avg": ReduceType.AVG, "min": ReduceType.MIN, "max": ReduceType.MAX}
        shape = valid.shape
        new_logp = logprobs.detach().float()
        old_logp = input_data["logprobs"].detach().float()
        log_ratio = new_logp - old_logp
        stats_tracker.denominator(n_valid_tokens=valid)
        stats_tracker.stat(
            importance_weight=torch.exp(log_ratio),
            approx_kl=log_ratio,
            new_logp=new_logp,
            old_logp=old_logp,
            entropy=entropy.detach().float(),
            actor_loss=token.loss.detach().float().view(shape),
            denominator="n_valid_tokens",
        )
        for key, value in token.metrics().items():
            name, how = ESS_METRICS.get(key, (f"ess_{key}", "avg"))
            stats_tracker.stat(
                **{name: value.float().expand(shape)},
                denominator="n_valid_tokens",
                reduce_type=reduce[how],
            )
        versions = input_data.get("versions")
        if isinstance(versions, torch.Tensor) and self.current_version is not None:
            with stats_tracker.scope("version_stats"):
                generated = valid & (versions.view(shape) >= 0)
                stats_tracker.denominator(n_valid_generated_tokens=generated)
                stats_tracker.stat(
                    sample_staleness_theta=(self.current_version - versions.view(shape)).float(),
                    denominator="n_valid_generated_tokens",
                )
