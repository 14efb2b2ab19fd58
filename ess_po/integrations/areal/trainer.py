"""``ESSPPOTrainer``: AReaL's ``PPOTrainer`` whose actor trains with the ESS objective."""

from __future__ import annotations

import warnings
from typing import Any

from areal.trainer.rl_trainer import PPOTrainer

__all__ = ["ESSPPOTrainer"]


class ESSPPOTrainer(PPOTrainer):
    """AReaL's ``PPOTrainer`` with :class:`~ess_po.integrations.areal.ESSFSDPPPOActor` as the
    actor engine.

    The one change for an AReaL user: ``ESSPPOTrainer(config, ...)`` where the script had
    ``PPOTrainer(config, ...)``. The ESS options come from ``config.actor``
    (:class:`~ess_po.integrations.areal.ESSActorConfig`, via
    :class:`~ess_po.integrations.areal.ESSGRPOConfig`); a plain ``GRPOConfig`` trains with their
    defaults. Rollout, reward, reference model, critic and
    weight updates are AReaL's. Only the ``fsdp`` actor backend is supported: with ``megatron``
    or ``archon`` the trainer warns and trains with AReaL's own loss.

    Relies on the private ``PPOTrainer._create_train_engine(actor_config, alloc)`` (its signature
    pinned in ``tests/areal/test_areal_loss.py``; built in SPMD mode by
    ``test_trainer_builds_the_ess_actor_engine``).
    """

    def _create_train_engine(self, actor_config: Any, alloc: Any) -> Any:
        if actor_config is not self.config.actor:  # the reference model, the teacher
            return super()._create_train_engine(actor_config, alloc)
        if alloc.backend != "fsdp":
            warnings.warn(
                f"ESSPPOTrainer: the ESS objective runs on AReaL's fsdp backend only; the "
                f"{alloc.backend!r} actor trains with AReaL's own loss. Set actor.backend to "
                "an fsdp allocation (e.g. 'fsdp:d2') for the ESS objective.",
                UserWarning,
                stacklevel=2,
            )
            return super()._create_train_engine(actor_config, alloc)
        from areal.utils.environ import is_single_controller

        from .actor import ESSFSDPPPOActor

        if is_single_controller():
            actor = ESSFSDPPPOActor.as_controller(actor_config, self.scheduler)
        else:
            actor = ESSFSDPPPOActor(config=actor_config)
        actor.create_process_group(parallel_strategy=alloc.parallel)
        return actor
