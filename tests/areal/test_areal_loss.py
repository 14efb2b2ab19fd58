"""``ESSLoss`` (the AReaL loss function) on packed micro-batches, the config, and the AReaL names
the adapter depends on. In-process, no engine: a few seconds after AReaL's import.

Opt-in like ``test_areal_engine.py``: skipped where AReaL does not import, unless
``ESS_PO_REQUIRE_AREAL=1``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import warnings
from pathlib import Path

import pytest

from ess_po.testing.requirements import require

# the imports below need AReaL: they follow the skip (E402 on purpose)
require("areal", "ESS_PO_REQUIRE_AREAL", "AReaL tests need its environment: run .ci/areal.sh")

import torch  # noqa: E402
from areal.api.cli_args import GRPOConfig, PPOActorConfig  # noqa: E402
from areal.utils import stats_tracker  # noqa: E402

import ess_po.integrations.areal as adapter  # noqa: E402
from ess_po import ess_stats  # noqa: E402
from ess_po.integrations.areal import (  # noqa: E402
    ESSActorConfig,
    ESSGRPOConfig,
    ESSLoss,
    ess_options,
    ignored_options,
)
from ess_po.testing.reference import naive_ess_loss  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_tracker():
    """Each test starts and ends with an empty default stats tracker."""
    stats_tracker.DEFAULT_TRACKER.stats.clear()
    yield
    stats_tracker.DEFAULT_TRACKER.stats.clear()


def packed(n: int = 23, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A packed micro-batch of three sequences as AReaL's FSDP engine hands it to the loss."""
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, 7, 15, n], dtype=torch.int32)
    mask = torch.zeros(n)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        mask[a + 2 : b - 1] = 1.0  # prompt, response, then the junk last position
    old = -torch.rand(n, generator=g) * 3
    new = (old + 0.4 * torch.randn(n, generator=g)).to(dtype).requires_grad_(True)
    adv = torch.randn(n, generator=g)
    data = {
        "loss_mask": mask,
        "logprobs": old,
        "advantages": adv,
        "cu_seqlens": cu,
        "versions": torch.where(mask.bool(), 3, -1).to(torch.int32),
    }
    return new, torch.rand(n, generator=g), data


def naive(new: torch.Tensor, data: dict, ess: float | None = None) -> torch.Tensor:
    """:func:`ess_po.testing.reference.naive_ess_loss` on the packed micro-batch (one row)."""
    row = (1, -1)
    fields = (data["logprobs"], data["advantages"], data["loss_mask"])
    return naive_ess_loss(new.view(row), *(x.view(row) for x in fields), ess=ess)


@pytest.mark.parametrize("scope", ["call", "step"])
def test_loss_and_gradient_equal_the_naive_formula(scope: str) -> None:
    new, entropy, data = packed()
    stats = None
    if scope == "step":  # the step: this micro-batch and another one
        other = torch.randn(2, 5)
        stats = ess_stats(torch.cat([(new.detach() - data["logprobs"])[None], 0 * new[None]], 0))
        stats = stats.merge(ess_stats(other))
    loss = ESSLoss(scope, stats, current_version=5)(new, entropy, data)
    ess = None if stats is None else float(stats.ess())
    reference = naive(new, data, ess)
    (g,) = torch.autograd.grad(loss, new)
    (g_ref,) = torch.autograd.grad(reference, new)
    torch.testing.assert_close(loss.double(), reference.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g.double(), g_ref.double(), rtol=1e-5, atol=1e-8)
    assert loss.dtype == torch.float32 and loss.dim() == 0


def test_bf16_log_probs_beside_fp32_behaviour_log_probs() -> None:
    new, entropy, data = packed(dtype=torch.bfloat16)
    loss = ESSLoss("call")(new, entropy, data)
    (g,) = torch.autograd.grad(loss, new)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g).all()
    # the same numbers as the naive formula on the bf16 values, in float64
    torch.testing.assert_close(loss.double(), naive(new, data).detach(), rtol=1e-5, atol=1e-6)


def test_masked_junk_stays_out_and_valid_nan_stays_visible() -> None:
    new, entropy, data = packed()
    junk = ~data["loss_mask"].bool()
    clean = ESSLoss("call")(new, entropy, data)
    dirty = {**data}
    dirty["logprobs"] = torch.where(junk, float("nan"), data["logprobs"])
    dirty["advantages"] = torch.where(junk, float("inf"), data["advantages"])
    new_dirty = torch.where(junk, float("-inf"), new.detach()).requires_grad_(True)
    loss = ESSLoss("call")(new_dirty, entropy, dirty)
    (g,) = torch.autograd.grad(loss, new_dirty)
    torch.testing.assert_close(loss, clean)
    assert (g[junk] == 0).all() and torch.isfinite(g).all()
    valid_nan = {**data, "advantages": torch.where(~junk, float("nan"), 0.0)}
    assert torch.isnan(ESSLoss("call")(new, entropy, valid_nan))


def test_no_host_sync_on_the_loss_path() -> None:
    """Meta tensors have no values: any ``.item()``, ``bool(tensor)`` or copy to the host in the
    loss or its stats-tracker records raises."""
    n = 11
    new = torch.empty(n, device="meta", requires_grad=True)
    data = {
        "loss_mask": torch.empty(n, device="meta"),
        "logprobs": torch.empty(n, device="meta"),
        "advantages": torch.empty(n, device="meta"),
        "versions": torch.empty(n, device="meta", dtype=torch.int32),
    }
    stats = ess_stats(torch.empty(2, n, device="meta"))
    for scope, s in (("call", None), ("step", stats)):
        loss = ESSLoss(scope, s, current_version=2)(new, torch.empty(n, device="meta"), data)
        loss.backward()
        assert loss.device.type == "meta"


def test_loss_module_has_no_host_sync_calls() -> None:
    """Static guard beside the meta run (as for the core's loss path)."""
    tree = ast.parse(Path(inspect.getfile(adapter.loss)).read_text())
    calls = [n.func for n in ast.walk(tree) if isinstance(n, ast.Call)]
    found = [f.attr for f in calls if isinstance(f, ast.Attribute)]
    assert not {"item", "tolist", "cpu", "numpy", "nonzero"} & set(found)


def test_ess_metrics_are_recorded_in_the_tracker() -> None:
    new, entropy, data = packed()
    out = ESSLoss("call", current_version=5)
    with stats_tracker.scope("ppo_actor"), stats_tracker.scope("update"):
        out(new, entropy, data)
    stats = stats_tracker.export_all()
    w = (new.detach() - data["logprobs"]).double().exp()[data["loss_mask"].bool()]
    ess = float(w.sum() ** 2 / (w.numel() * (w * w).sum()))
    assert stats["ppo_actor/update/ess"] == pytest.approx(ess, rel=1e-6)
    assert stats["ppo_actor/update/ess_ratio_max"] == pytest.approx(float(w.max()), rel=1e-6)
    staleness = "ppo_actor/update/version_stats/sample_staleness_theta/avg"
    assert stats[staleness] == 2.0  # version 5 trains tokens of version 3
    assert "ppo_actor/update/ess_step_free" not in stats  # recorded by the actor, per step


def test_step_scope_without_statistics_names_the_fix() -> None:
    with pytest.raises(ValueError, match="stats=") as err:
        ESSLoss("step")
    assert "ESSPPOActor" in str(err.value)


def test_teacher_log_probs_are_warned_about_once() -> None:
    new, entropy, data = packed()
    data["teacher_logp"] = data["logprobs"]
    loss = ESSLoss("call")
    with pytest.warns(UserWarning, match="teacher_logp"):
        loss(new, entropy, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(new, entropy, data)


# --- config ---------------------------------------------------------------------------------


def test_config_defaults_and_plain_ppo_config() -> None:
    assert ess_options(PPOActorConfig()) == ("step", True, False)
    config = ESSActorConfig(ess_scope="call", ess_free_path=False)
    assert ess_options(config) == ("call", False, False)
    assert isinstance(config, PPOActorConfig)
    assert ESSGRPOConfig.__dataclass_fields__["actor"].type in (ESSActorConfig, "ESSActorConfig")
    assert isinstance(ESSGRPOConfig().actor, ESSActorConfig)
    assert issubclass(ESSGRPOConfig, GRPOConfig)


@pytest.mark.parametrize("scope", ["sequence", "batch", None])
def test_bad_scope_names_the_choices(scope: object) -> None:
    with pytest.raises(ValueError, match="ess_scope must be one of") as err:
        ESSActorConfig(ess_scope=scope)
    assert "actor.ess_scope" in str(err.value)


def test_ignored_host_options_are_named() -> None:
    assert ignored_options(PPOActorConfig()) == []
    config = dataclasses.replace(
        PPOActorConfig(), use_sapo_loss=True, c_clip=3.0, importance_sampling_level="sequence"
    )
    found = " ".join(ignored_options(config))
    for name in ("use_sapo_loss", "c_clip", "importance_sampling_level"):
        assert name in found


# --- the AReaL names the adapter relies on (a contract, like the TRL adapter's) ------------


def test_areal_private_names_the_adapter_depends_on() -> None:
    """``PPOActor._ppo_update`` hands ``engine.train_batch`` a ``functools.partial`` of
    ``grpo_loss_fn`` with ``current_version`` among its keywords, and ``PPOTrainer`` builds its
    actor with ``_create_train_engine(actor_config, alloc)``. The engine tests check the
    behaviour (every step trained with ``ESSLoss``); this pins the names and signatures."""
    from areal.engine.fsdp_engine import FSDPEngine, FSDPPPOActor
    from areal.trainer.ppo import actor as areal_actor
    from areal.trainer.rl_trainer import PPOTrainer

    assert list(inspect.signature(PPOTrainer._create_train_engine).parameters) == [
        "self",
        "actor_config",
        "alloc",
    ]
    source = inspect.getsource(areal_actor.PPOActor._ppo_update)
    assert "self.engine.train_batch(" in source and "grpo_loss_fn," in source
    assert "current_version=current_version" in source
    params = inspect.signature(areal_actor.grpo_loss_fn).parameters
    assert list(params)[:3] == ["logprobs", "entropy", "input_data"]
    assert list(inspect.signature(FSDPEngine.train_batch).parameters) == [
        "self",
        "input_",
        "loss_fn",
        "loss_weight_fn",
    ]
    assert "data_parallel_group" in dir(FSDPEngine)
    assert issubclass(adapter.ESSFSDPPPOActor, FSDPPPOActor)
