"""verl 0.9.1's rollout-correction bypass mode and ``loss_mode`` (issue 10, items 7 and 8).

The actor-level check (the v1 trainer hands the rollout log-probs to the ESS loss as
old_log_prob) is ``tests/verl/test_verl_actor.py::test_bypass_mode_hands_rollout_log_probs_to_the_ess_loss``.
These fast tests pin which trainer rewrites ``loss_mode``: only the deprecated v0 trainer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("verl.trainer.ppo.core_algos")
pytest.importorskip("hydra")


def _compose(overrides: list[str]):
    import verl
    from hydra import compose, initialize_config_dir

    config_dir = Path(verl.__file__).parent / "trainer" / "config"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


def test_default_trainer_is_v1() -> None:
    """``main_ppo`` runs the v1 trainer unless ``trainer.use_v1=False`` (the v0 trainer is
    deprecated and warns)."""
    assert _compose([]).trainer.use_v1 is True


def test_v0_bypass_mode_overwrites_loss_mode() -> None:
    """The deprecated v0 trainer (``ray_trainer.RayPPOTrainer``) calls ``apply_bypass_mode``,
    which replaces ``policy_loss.loss_mode=ess`` with ``bypass_mode``."""
    from verl.protocol import DataProto
    from verl.trainer.ppo.rollout_corr_helper import apply_bypass_mode

    config = _compose(
        [
            "actor_rollout_ref.actor.policy_loss.loss_mode=ess",
            "algorithm.rollout_correction.bypass_mode=True",
        ]
    )
    rollout = torch.randn(2, 3)
    batch = DataProto.from_dict(tensors={"rollout_log_probs": rollout})
    policy_loss = config.actor_rollout_ref.actor.policy_loss
    apply_bypass_mode(batch, config.algorithm.rollout_correction, policy_loss)
    assert torch.equal(batch.batch["old_log_probs"], rollout)
    assert policy_loss.loss_mode == "bypass_mode"


def test_v1_trainer_never_calls_apply_bypass_mode() -> None:
    """The v1 trainer modules do not reference ``apply_bypass_mode`` or assign ``loss_mode``
    (their bypass branch only copies the rollout log-probs; the actor test runs it)."""
    import importlib.util

    spec = importlib.util.find_spec("verl.trainer.ppo.v1")
    assert spec is not None and spec.submodule_search_locations
    sources = sorted(Path(spec.submodule_search_locations[0]).glob("*.py"))
    assert any(p.name == "trainer_base.py" for p in sources)
    for path in sources:
        text = path.read_text()
        assert "apply_bypass_mode" not in text, path
        assert '["loss_mode"] =' not in text and ".loss_mode =" not in text, path
