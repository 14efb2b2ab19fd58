"""``ESSGRPOTrainer``: TRL's ``GRPOTrainer`` with the ESS objective instead of the clipped surrogate.

Usage is a one-line change::

    from ess_po.integrations.trl import ESSGRPOTrainer

    trainer = ESSGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)

Generation, rewards, advantages, reference model, PEFT, callbacks, checkpointing and evaluation
are TRL's; only the loss hook ``_compute_loss`` differs (``trainer.py``). The ESS options are
fields of :class:`ESSGRPOConfig` (``config.py``). Requires the ``trl`` extra (TRL 1.16).
"""

try:
    import trl  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'ess_po.integrations.trl needs TRL 1.16: pip install -e ".[trl]" in a checkout of '
        'ess-po (pip install "ess-po[trl]" once released).'
    ) from err

from ess_po.integrations.trl.config import SUPPORTED_LOSS_TYPES, ESSGRPOConfig
from ess_po.integrations.trl.trainer import ESSGRPOTrainer

__all__ = ["SUPPORTED_LOSS_TYPES", "ESSGRPOConfig", "ESSGRPOTrainer"]
