"""AReaL adapter: the ESS objective as the actor loss of AReaL's asynchronous RL trainer.

Usage is a one-line change in an AReaL training script::

    from ess_po.integrations.areal import ESSPPOTrainer  # instead of areal's PPOTrainer

    with ESSPPOTrainer(config, train_dataset=..., valid_dataset=...) as trainer:
        trainer.train(workflow=...)

The ESS options are fields of ``config.actor`` when the config is an :class:`ESSGRPOConfig`
(``load_expr_config(args, ESSGRPOConfig)``; YAML ``actor.ess_scope: step``); with AReaL's plain
``GRPOConfig`` they keep their defaults. Without the trainer, build the actor engine directly:
``ESSFSDPPPOActor(config)`` is AReaL's ``FSDPPPOActor`` training with the ESS objective.
Requires the ``areal`` extra (AReaL 1.0.4; see docs/areal.md for the install).
"""

try:
    import areal  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without AReaL
    raise ImportError(
        "ess_po.integrations.areal needs AReaL 1.0.4, which pins torch<2.11: see "
        "docs/areal.md for the install (.ci/areal.sh builds a tested environment)."
    ) from err

from ess_po.integrations.areal.actor import ESSFSDPPPOActor, ESSPPOActor, ignored_options
from ess_po.integrations.areal.config import (
    ESS_SCOPES,
    ESSActorConfig,
    ESSGRPOConfig,
    ESSOptions,
    ess_options,
)
from ess_po.integrations.areal.loss import ESS_METRICS, ESSLoss
from ess_po.integrations.areal.trainer import ESSPPOTrainer

__all__ = [
    "ESS_METRICS",
    "ESS_SCOPES",
    "ESSActorConfig",
    "ESSFSDPPPOActor",
    "ESSGRPOConfig",
    "ESSLoss",
    "ESSOptions",
    "ESSPPOActor",
    "ESSPPOTrainer",
    "ess_options",
    "ignored_options",
]
