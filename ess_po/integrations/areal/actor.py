"""``ESSPPOActor``: AReaL's ``PPOActor`` training with the ESS objective, and the FSDP engine
that carries it (``ESSFSDPPPOActor``).

AReaL has no loss registry: ``PPOActor._ppo_update`` (private) computes its statistics, splits
the batch into ``ppo_n_minibatches`` mini-batches and, for each, calls
``engine.train_batch(mb, loss_fn=functools.partial(grpo_loss_fn, ...), loss_weight_fn=...)``,
one optimizer step each. ``ESSPPOActor`` keeps all of that and gives the actor an engine whose
``train_batch`` swaps AReaL's ``grpo_loss_fn`` for :class:`~ess_po.integrations.areal.ESSLoss`,
after computing the step's ESS statistics when ``ess_scope="step"``. The private names this
relies on (that ``_ppo_update`` passes a ``functools.partial`` of
``areal.trainer.ppo.actor.grpo_loss_fn`` with the keyword ``current_version`` to
``engine.train_batch``) are pinned by ``test_areal_private_names_the_adapter_depends_on`` in
``tests/areal/test_areal_loss.py``; the engine tests check that every step trains with
``ESSLoss``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from areal.engine.fsdp_engine import FSDPPPOActor
from areal.trainer.ppo import actor as areal_actor
from areal.utils import stats_tracker

from ess_po import ESSStats, step_stats

from .config import ess_options
from .loss import ESSLoss

__all__ = ["ESSFSDPPPOActor", "ESSPPOActor", "ignored_options"]


def ignored_options(config: Any) -> list[str]:
    """The ``PPOActorConfig`` settings of AReaL's loss that the ESS objective replaces or does not
    apply (each is warned about once when the actor is built; training goes on)."""
    found = []
    if getattr(config, "use_sapo_loss", False):
        found.append("use_sapo_loss=True (the SAPO loss is replaced by the ESS objective)")
    level = getattr(config, "importance_sampling_level", "token")
    if level != "token":
        found.append(
            f"importance_sampling_level={level!r} (the ESS objective weights tokens; "
            "its ESS is over the step's or the call's tokens)"
        )
    if getattr(config, "m2_threshold", None) is not None:
        found.append("m2_threshold (M2PO token masking is not applied)")
    if getattr(config, "rejection_sampling", None) is not None:
        found.append("rejection_sampling (the ESS cap bounds the weights instead)")
    if getattr(config, "c_clip", None) is not None:
        found.append("c_clip (the ESS objective has no dual clip)")
    if getattr(config, "eps_clip_higher", None) is not None:
        found.append("eps_clip_higher (the ESS objective has no clipping)")
    return found


class _ESSEngine:
    """The actor's view of its engine: every attribute is the engine's, except ``train_batch``,
    which trains the mini-batch with the ESS objective (:meth:`ESSPPOActor.train_batch`)."""

    def __init__(self, engine: Any, actor: ESSPPOActor) -> None:
        self._engine = engine
        self._actor = actor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def train_batch(
        self, input_: Any, loss_fn: Callable[..., torch.Tensor], loss_weight_fn: Callable
    ) -> dict[str, float]:
        return self._actor.train_batch(input_, loss_fn, loss_weight_fn)


class ESSPPOActor(areal_actor.PPOActor):
    """AReaL's ``PPOActor`` with the ESS objective as its loss.

    Advantages, rewards, micro-batching, token normalisation and statistics are AReaL's. The
    loss maps AReaL's log-probs onto the core: ``logprobs`` (the training forward) is
    ``logp_new``; ``input_data["logprobs"]`` is ``logp_old``: the behaviour policy's (the
    inference engine's) with ``use_decoupled_loss=True``, and AReaL's ``π_old`` (recomputed if
    ``recompute_logprob``) otherwise; ``prox_logp`` (recomputed by ``compute_logp``) supplies
    the step's ESS statistics on the free path. The ESS options are read from the config
    (:class:`~ess_po.integrations.areal.ESSActorConfig`; defaults for a plain
    ``PPOActorConfig``).
    """

    def __init__(self, config: Any, engine: Any) -> None:
        super().__init__(config, engine)
        self.ess = ess_options(config)
        self.warned: set[str] = set()
        self.optimizer_steps = 0  # engine.train_batch calls made through this actor
        self.logp_at_step: int | None = None  # optimizer_steps when compute_logp last ran
        self.engine = _ESSEngine(engine, self)
        for option in ignored_options(config):
            warnings.warn(
                f"ESS objective: AReaL's {option}; it is ignored.", UserWarning, stacklevel=2
            )

    def compute_logp(self, data: Any) -> Any:
        """AReaL's ``compute_logp``, remembering when it ran (for the free path)."""
        result = super().compute_logp(data)
        self.logp_at_step = self.optimizer_steps
        return result

    def train_batch(
        self, input_: Any, loss_fn: Callable[..., torch.Tensor], loss_weight_fn: Callable
    ) -> dict[str, float]:
        """One optimizer step of the engine, with the ESS objective in place of AReaL's GRPO loss.

        A ``loss_fn`` that is not a ``functools.partial`` of AReaL's ``grpo_loss_fn`` (another
        caller's loss) is passed through unchanged, with a warning.
        """
        engine = self.engine._engine
        if getattr(loss_fn, "func", None) is not areal_actor.grpo_loss_fn:
            if "foreign_loss" not in self.warned:
                self.warned.add("foreign_loss")
                warnings.warn(
                    "ESSPPOActor: engine.train_batch was called with a loss that is not AReaL's "
                    f"grpo_loss_fn ({loss_fn!r}); it is trained as given, without the ESS "
                    "objective.",
                    UserWarning,
                    stacklevel=2,
                )
            return engine.train_batch(input_, loss_fn, loss_weight_fn)
        keywords: Mapping[str, Any] = loss_fn.keywords  # type: ignore[attr-defined]
        stats, free = None, False
        if self.ess.ess_scope == "step":
            stats, free = self.step_statistics(input_)
            # once per optimizer step (a Python bool: no host sync); exported as the mean
            stats_tracker.scalar(ess_step_free=float(free))
        loss = ESSLoss(
            self.ess.ess_scope,
            stats,
            free=free,
            current_version=keywords.get("current_version"),
            check_values=self.ess.check_values,
            warned=self.warned,
        )
        try:
            return engine.train_batch(input_, loss, loss_weight_fn)
        finally:
            self.optimizer_steps += 1

    def step_statistics(self, input_: Any) -> tuple[ESSStats, bool]:
        """The ESS statistics of the mini-batch ``input_`` (padded ``(B, T)`` dict, or a list of
        them) under the current parameters, all-reduced over the data-parallel group, and
        whether they came from the free path (no forward)."""
        parts = list(input_) if isinstance(input_, list | tuple) else [input_]
        free = (
            self.ess.free_path
            and self.logp_at_step == self.optimizer_steps
            and bool(getattr(self.config, "recompute_logprob", False))
            and all(part.get("prox_logp") is not None for part in parts)
        )
        if free:
            current = [part["prox_logp"] for part in parts]
        else:
            current = [self._forward_logp(part) for part in parts]
        pairs = []
        for part, logp in zip(parts, current, strict=True):
            width = logp.shape[-1]
            mask = part["loss_mask"][..., :width]
            pairs.append((logp.float() - part["logprobs"][..., :width].float(), mask))
        group = self.engine._engine.data_parallel_group
        return step_stats(pairs, process_group=group), free

    def _forward_logp(self, part: Mapping[str, Any]) -> torch.Tensor:
        """Log-probs of ``part`` under the current parameters: AReaL's own no-grad forward
        (``compute_logp``'s path), with the same micro-batch packing as the training forward."""
        engine = self.engine._engine
        engine.eval()
        try:
            with torch.no_grad():
                return engine.forward(
                    input_=dict(part), aggregate_fn=functools.partial(torch.cat, dim=-1)
                )
        finally:
            engine.train()


class ESSFSDPPPOActor(FSDPPPOActor):
    """AReaL's FSDP actor engine (``areal.engine.fsdp_engine.FSDPPPOActor``) whose actor is an
    :class:`ESSPPOActor`: ``ppo_update`` trains with the ESS objective; everything else is
    AReaL's."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.actor = ESSPPOActor(config, self)
