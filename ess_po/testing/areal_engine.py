"""AReaL's FSDP actor engine with the ESS actor, built from code on the CPU, for the AReaL tests
and the asynchronous benchmark (``tests/areal/``, ``ess_po.testing.areal_async``).

Needs AReaL (the environment ``.ci/areal.sh`` builds). One gloo rank per process: the caller runs
under torchrun (:func:`ess_po.testing.processes.run_ranks`), so ``RANK``, ``WORLD_SIZE`` and the
rendezvous are set.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["build_engine", "build_optimizer_default"]


def build_optimizer_default() -> Any:
    """Adam with ``lr=0`` and gradient clipping at 1e9: a step leaves the parameters as they
    were and the clip coefficient is exactly 1, so the gradients can be read after
    ``ppo_update`` (AReaL zeroes them only at the start of the next ``train_batch``)."""
    from areal.api.cli_args import OptimizerConfig

    return OptimizerConfig(
        type="adam",
        lr=0.0,
        weight_decay=0.0,
        gradient_clipping=1e9,
        lr_scheduler_type="constant",
        warmup_steps_proportion=0.0,
    )


def build_engine(model_dir: str, world: int, via_trainer: bool = False, **overrides: Any):
    """AReaL's FSDP actor engine with the ESS actor, built directly (``ESSFSDPPPOActor(config)``)
    or, ``via_trainer``, by ``ESSPPOTrainer._create_train_engine`` as AReaL's trainer builds its
    actor in SPMD mode (``AREAL_SPMD_MODE=1``)."""
    from areal.api.alloc_mode import ParallelStrategy
    from areal.api.cli_args import MicroBatchSpec
    from areal.api.io_struct import FinetuneSpec

    from ess_po.integrations.areal import ESSActorConfig, ESSFSDPPPOActor

    fields = {
        "experiment_name": "ess",
        "trial_name": "t",
        "path": model_dir,
        "backend": f"fsdp:d{world}",
        "attn_impl": "sdpa",
        "dtype": "float32",
        "mb_spec": MicroBatchSpec(n_mbs=2),
        "optimizer": build_optimizer_default(),  # lr=0: gradients are read, not applied
        "ppo_n_minibatches": 1,
        "recompute_logprob": True,
        "use_decoupled_loss": False,
        "kl_ctl": 0.0,
        "adv_norm": None,
    }
    fields.update(overrides)
    config = ESSActorConfig(**fields)
    if via_trainer:
        from areal.api.alloc_mode import ModelAllocation
        from areal.api.cli_args import GRPOConfig

        from ess_po.integrations.areal import ESSPPOTrainer

        os.environ["AREAL_SPMD_MODE"] = "1"
        trainer = ESSPPOTrainer.__new__(ESSPPOTrainer)  # only the engine factory is exercised
        trainer.config = GRPOConfig(actor=config)
        alloc = ModelAllocation.from_str(config.backend, name="actor")
        engine = trainer._create_train_engine(config, alloc)
    else:
        engine = ESSFSDPPPOActor(config)
        engine.create_process_group(parallel_strategy=ParallelStrategy(data_parallel_size=world))
    engine.initialize(
        addr=None, ft_spec=FinetuneSpec(total_train_epochs=1, dataset_size=64, train_batch_size=8)
    )
    return engine
