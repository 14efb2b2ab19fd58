r"""The ESS policy losses with verl's policy-loss signature, built like verl's own.

Every built-in verl loss computes a ``(B, T)`` per-token loss and reduces it with
``verl.trainer.ppo.core_algos.agg_loss(loss_mat, loss_mask, loss_agg_mode,
**config.global_batch_info)``; these do the same with the core's per-token objective
(:func:`ess_po.ess_token_loss`). For one micro-batch on one rank, with ``d = log_prob -
old_log_prob``, ``w = exp(d)`` and ``c = rollout_is_weights`` (or 1):

.. math::

    \ell_{bt} = -\mathrm{sg}\big(\min(w_{bt}, \mathrm{ESS})\big)\, A_{bt}\, c_{bt}
        \log\pi_\theta(bt) + (1 - \mathrm{ESS})\,(d_{bt} + e^{-d_{bt}} - 1),
    \qquad \mathrm{loss} = \mathrm{agg\_loss}(\ell, \mathrm{response\_mask}, \ldots)

The ESS is taken over the tokens named by ``ess_scope``: the call's (``"call"``, all-reduced
over the ESS process group), the optimizer step's (``"step"``, statistics from
:class:`.step_scope.StepScope`) or each sequence's (``"sequence"``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import torch

from ess_po import ESSScope, ess_token_loss

from .step_scope import STEP_LOSS_NAME, STEP_SCOPE_ENV, StepScope

VERL_LOSS_AGG_MODES: Final = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "seq-mean-token-mean",
)
"""The verl ``actor.loss_agg_mode`` values (all of verl 0.9's); ``agg_loss`` rejects others."""

PolicyLoss = Callable[..., tuple[torch.Tensor, dict[str, Any]]]

#: The count ``agg_loss`` divides by, per mode (``None``: a plain sum).
_COUNT_KEY: Final = {
    "token-mean": "batch_num_tokens",
    "seq-mean-token-sum": "global_batch_size",
    "seq-mean-token-sum-norm": "global_batch_size",
    "seq-mean-token-mean": "global_batch_size",
}
#: The core diagnostics logged (the metrics table of the verl guide), in verl's names.
_LOGGED: Final = {
    "ess": "actor/ess",
    "ess_min": "actor/ess_min",
    "capped_frac": "actor/ess_capped_frac",
    "capped_mass": "actor/ess_capped_mass",
    "kl_behavior": "actor/ess_kl_behavior",
    "ratio_mean": "actor/ess_ratio_mean",
    "ratio_max": "actor/ess_ratio_max",
    "ratio_min": "actor/ess_ratio_min",
}


def global_batch_info(config: Any) -> Mapping[str, Any]:
    """``config.global_batch_info`` of an ``ActorConfig``, ``DictConfig`` or dict; ``{}`` if absent."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        info = config.get("global_batch_info", None)
    else:
        info = getattr(config, "global_batch_info", None)
    if info is None:
        return {}
    if not isinstance(info, Mapping):
        raise ValueError(
            "config.global_batch_info must be a mapping (dp_size, batch_num_tokens, "
            f"global_batch_size, loss_scale_factor), got {type(info).__name__}; pass verl's "
            "ActorConfig (or a dict) as `config`."
        )
    return info


def agg_loss_kwargs(
    loss_agg_mode: str, response_mask: torch.Tensor, info: Mapping[str, Any]
) -> dict[str, Any]:
    """``info`` as keyword arguments for ``agg_loss``, guarded against an empty micro-batch.

    ``agg_loss`` divides by a count: ``batch_num_tokens`` (token-mean) or ``global_batch_size``
    (seq-mean-*), the local one when absent. With no valid token in the ``(B, T)``
    ``response_mask`` (all masked, or ``B = 0``: verl pads ranks to equal micro-batch counts)
    that count is 0, the masked sum is 0, and ``agg_loss`` returns ``0 / 0 = NaN`` with NaN
    gradients. A count of 0 is replaced by 1 (loss 0, gradient 0); every other count is
    passed as is. ``None`` entries are dropped (``agg_loss``'s defaults).
    """
    kwargs = {key: value for key, value in info.items() if value is not None}
    key = _COUNT_KEY.get(loss_agg_mode)
    if key is None:
        return kwargs
    count = kwargs.get(key)
    if count is None:
        if int(kwargs.get("dp_size", 1)) > 1:
            return kwargs  # agg_loss raises, naming the missing key
        valid = response_mask != 0
        count = valid.sum() if key == "batch_num_tokens" else valid.any(-1).sum()
    if isinstance(count, torch.Tensor):
        kwargs[key] = torch.where(count == 0, torch.ones_like(count), count)
    else:
        kwargs[key] = count or 1
    return kwargs


def verl_metrics(metrics: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Core diagnostics under verl's ``actor/`` prefix (``actor/ess``, ``actor/ess_capped_frac``...).

    Values stay detached 0-dim tensors: verl 0.9 wraps them in ``verl.utils.metric.Metric``,
    which calls ``.item()`` itself, so the loss adds no host sync.
    """
    return {name: metrics[key] for key, name in _LOGGED.items()}


_NO_STEP_STATS: Final = (
    f"policy_loss.loss_mode={STEP_LOSS_NAME} needs the ESS statistics of the optimizer step, "
    "which a no-grad pre-pass computes; none were set. Set "
    f"{STEP_SCOPE_ENV}=1 in the environment of verl's workers (for Ray: "
    f"+ray_kwargs.ray_init.runtime_env.env_vars.{STEP_SCOPE_ENV}=1) or call "
    "ess_po.integrations.verl.enable_step_scope() in each worker, or use loss_mode=ess."
)


def make_policy_loss(ess_scope: ESSScope, scope: StepScope, name: str) -> PolicyLoss:
    """A verl policy loss with one ESS per ``ess_scope`` (``"call"``, ``"step"``, ``"sequence"``).

    The returned function has verl's signature ``(old_log_prob, log_prob, advantages,
    response_mask, loss_agg_mode="token-mean", config=None, rollout_is_weights=None)`` with
    ``(B, T)`` tensors, and returns ``(loss, metrics)``: the scalar ``agg_loss`` of the per-token
    ESS loss and detached 0-dim ``actor/ess*`` diagnostics. ``scope`` supplies the process group
    and, for ``"step"``, the step statistics (``actor/ess_step_free`` tells where they came from).
    """
    step = ess_scope == "step"

    def policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        from verl.trainer.ppo.core_algos import agg_loss

        stats, free = scope.stats, scope.free
        if step and stats is None:
            raise ValueError(_NO_STEP_STATS)
        token = ess_token_loss(
            log_prob,
            old_log_prob,
            advantages,
            response_mask,
            ess_scope=ess_scope,
            rollout_weights=rollout_is_weights,
            process_group=scope.process_group(),
            stats=stats if step else None,
        )
        info = agg_loss_kwargs(loss_agg_mode, response_mask, global_batch_info(config))
        loss = agg_loss(
            loss_mat=token.loss, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **info
        )
        metrics = verl_metrics(token.metrics())
        if step:
            metrics["actor/ess_step_free"] = torch.tensor(float(free), device=loss.device)
        return loss, metrics

    policy_loss.__name__ = policy_loss.__qualname__ = name
    policy_loss.__module__ = "ess_po.integrations.verl"
    return policy_loss
