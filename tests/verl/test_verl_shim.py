"""Tests for the verl shim (``ess_po.integrations.verl``) against the installed verl package.

Conventions: ``(B, T)`` batches, ``log_prob`` is a leaf requiring grad; gradients are compared
w.r.t. ``log_prob`` (the only differentiable input of a verl policy loss). Exactness tests run in
float64 (``assert_close`` defaults: rtol 1e-7, atol 1e-7); one test runs in float32.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
shim = pytest.importorskip("ess_po.integrations.verl")
from ess_po.testing.batches import make_batch as make_core_batch  # noqa: E402
from ess_po.testing.processes import child_env, run_ranks  # noqa: E402

MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "seq-mean-token-mean",
)
REPO = Path(__file__).resolve().parents[2]

Batch = dict[str, Any]


def make_batch(
    batch_size: int = 6,
    horizon: int = 7,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    drift: float = 0.4,
) -> Batch:
    """:func:`ess_po.testing.batches.make_batch` as verl's policy losses take it: ``(B, T)``
    tensors under verl's names, a bool mask, token-level advantages and rollout weights in
    ``[0.5, 1.5)``.

    ``drift`` is the std of ``log_prob - old_log_prob`` (0 = on-policy). Row 0 is fully masked
    (verl excludes such rows from sequence counts).
    """
    b = make_core_batch(
        batch_size, horizon, seed=seed, staleness=drift, dtype=dtype, adv_shape="B1", empty_rows=1
    )
    g = torch.Generator().manual_seed(seed)
    weights = 0.5 + torch.rand(batch_size, horizon, generator=g, dtype=torch.float64)
    return {
        "old_log_prob": b.logp_old,
        "log_prob": b.logp_new.detach(),
        "advantages": b.advantages.expand(batch_size, horizon).contiguous(),
        "response_mask": b.mask,
        "rollout_is_weights": weights.to(dtype),
    }


def rows(batch: Batch, sl: slice) -> Batch:
    return {k: v[sl] for k, v in batch.items()}


def cat(*batches: Batch) -> Batch:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def global_info(batch: Batch, *, dp_size: int = 1, loss_scale_factor: int | None = None) -> dict:
    """``global_batch_info`` as verl's actor fills it for a mini-batch equal to ``batch``."""
    return {
        "dp_size": dp_size,
        "batch_num_tokens": int(batch["response_mask"].sum()),
        "global_batch_size": batch["response_mask"].shape[0],
        "loss_scale_factor": loss_scale_factor,
    }


def run(
    fn: Callable[..., tuple[torch.Tensor, dict]],
    batch: Batch,
    mode: str,
    config: Any,
    *,
    weights: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Call a verl policy loss the way ``verl.workers.utils.losses.ppo_loss`` does; return
    ``(loss, d loss / d log_prob, metrics)``."""
    log_prob = batch["log_prob"].clone().requires_grad_(True)
    loss, metrics = fn(
        old_log_prob=batch["old_log_prob"],
        log_prob=log_prob,
        advantages=batch["advantages"],
        response_mask=batch["response_mask"],
        loss_agg_mode=mode,
        config=config,
        rollout_is_weights=batch["rollout_is_weights"] if weights else None,
    )
    (grad,) = torch.autograd.grad(loss, log_prob)
    return loss.detach(), grad, metrics


def reference_token_loss(
    log_prob: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    ess: torch.Tensor,
    weights: torch.Tensor | None,
) -> torch.Tensor:
    """Per-token ESS loss (B, T), written independently of the core, for a given scalar ESS:
    ``-sg(min(w, ESS)) * A * c * logp + (1 - ESS) * (d + exp(-d) - 1)``."""
    d = log_prob - old
    c = 1.0 if weights is None else weights
    coef = torch.minimum(d.detach().exp(), ess) * adv * c
    return -coef * log_prob + (1.0 - ess) * (d + torch.exp(-d) - 1.0)


# ----------------------------------------------------------------------------- registration


_PROBE = """
    import sys
    assert "ess_po" not in sys.modules
    import verl
    from verl.trainer.ppo.core_algos import get_policy_loss_fn
    fn = get_policy_loss_fn("ess")
    seq = get_policy_loss_fn("ess_seq")
    print(fn.__module__, fn.__name__, seq.__name__)
"""
_PROBE_ENVS = {
    "entry_point": {},
    "external_modules": {
        "VERL_USE_EXTERNAL_PLUGINS": "none",
        "VERL_USE_EXTERNAL_MODULES": "ess_po.integrations.verl",
    },
}
_PROBE_OK = "ess_po.integrations.verl compute_policy_loss_ess compute_policy_loss_ess_seq"


@pytest.fixture(scope="module")
def fresh_probes() -> dict[str, tuple[int, str, str]]:
    """Run the probe in fresh interpreters, one per registration route, concurrently (each pays
    verl's ~5 s import once). Returns ``{route: (returncode, stdout, stderr)}``."""
    procs = {
        route: subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_PROBE)],
            env=child_env(**update),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for route, update in _PROBE_ENVS.items()
    }
    results = {}
    for route, proc in procs.items():
        out, err = proc.communicate(timeout=240)
        results[route] = (proc.returncode, out, err)
    return results


def _probe_result(fresh_probes: dict[str, tuple[int, str, str]], route: str) -> str:
    returncode, out, err = fresh_probes[route]
    assert returncode == 0, err[-3000:]
    return out.strip().splitlines()[-1]


def test_entry_point_is_declared() -> None:
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="verl.plugins")}
    if "ess" not in eps:
        pytest.fail("ess-po is not installed with its entry point: run pip install -e . --no-deps")
    assert eps["ess"] == "ess_po.integrations.verl"


@pytest.mark.slow
def test_import_verl_registers_ess_via_entry_point(fresh_probes: dict) -> None:
    """A fresh ``import verl`` (nothing imported the shim) makes ``loss_mode=ess`` resolvable."""
    assert _probe_result(fresh_probes, "entry_point") == _PROBE_OK


@pytest.mark.slow
def test_external_modules_fallback_registers_ess(fresh_probes: dict) -> None:
    """With entry-point discovery disabled, ``VERL_USE_EXTERNAL_MODULES`` still registers ``ess``."""
    assert _probe_result(fresh_probes, "external_modules") == _PROBE_OK


def test_registry_holds_shim_in_process() -> None:
    assert core_algos.get_policy_loss_fn("ess") is shim.compute_policy_loss_ess
    assert core_algos.get_policy_loss_fn("ess_seq") is shim.compute_policy_loss_ess_seq


# ----------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize(
    "info_kind", ["local", "global", "global-norm-factor"], ids=lambda s: f"info={s}"
)
@pytest.mark.parametrize("mode", MODES)
def test_matches_verl_agg_loss(mode: str, info_kind: str) -> None:
    """Feeding the per-token ESS loss (ESS taken from the shim's metric) to verl's own
    ``agg_loss`` with the same ``global_batch_info`` gives the shim's loss and gradient."""
    batch = make_batch(seed=2)
    if info_kind == "local":
        info: dict = {}
    else:
        info = global_info(batch, dp_size=2, loss_scale_factor=None)
        info["batch_num_tokens"] += 3
        info["global_batch_size"] += 1
        if info_kind == "global-norm-factor":
            info["loss_scale_factor"] = 11
    loss, grad, metrics = run(
        shim.compute_policy_loss_ess, batch, mode, {"global_batch_info": info}
    )
    ess = metrics["actor/ess"]
    assert 0.0 < float(ess) <= 1.0

    log_prob = batch["log_prob"].clone().requires_grad_(True)
    token_loss = reference_token_loss(
        log_prob, batch["old_log_prob"], batch["advantages"], ess, batch["rollout_is_weights"]
    )
    ref = core_algos.agg_loss(token_loss, batch["response_mask"], mode, **info)
    (ref_grad,) = torch.autograd.grad(ref, log_prob)
    assert_close(loss, ref.detach().to(loss.dtype))
    assert_close(grad, ref_grad)


def test_float32_matches_float64() -> None:
    """float32 inputs give the float64 result within float32 tolerances (rtol 1.3e-6, atol 1e-5)."""
    b64 = make_batch(seed=3)
    b32 = {k: v.float() if v.is_floating_point() else v for k, v in b64.items()}
    cfg = {"global_batch_info": global_info(b64)}
    loss64, grad64, _ = run(shim.compute_policy_loss_ess, b64, "token-mean", cfg)
    loss32, grad32, _ = run(shim.compute_policy_loss_ess, b32, "token-mean", cfg)
    assert loss32.dtype == torch.float32 and grad32.dtype == torch.float32
    assert_close(loss32, loss64.float())
    assert_close(grad32, grad64.float())


# ----------------------------------------------------------------------------- micro-batching

SPLIT = (slice(0, 2), slice(2, 3), slice(3, 6))


def _split_vs_whole(fn: Callable, whole: Batch, parts: list[Batch], mode: str) -> None:
    info = global_info(whole)
    loss_w, grad_w, _ = run(fn, whole, mode, {"global_batch_info": info})
    losses, grads = zip(
        *(run(fn, part, mode, {"global_batch_info": info})[:2] for part in parts), strict=True
    )
    assert_close(sum(losses), loss_w)
    assert_close(torch.cat(grads), grad_w)


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_sum_to_whole_with_sequence_scope(mode: str) -> None:
    """Property: with ``ess_seq`` (one ESS per sequence, independent of the split) and verl's
    global batch info for the mini-batch, sum over micro-batches of (loss, grad) == (loss, grad)
    of a single call on the whole mini-batch, for off-policy data."""
    whole = make_batch(seed=4)
    _split_vs_whole(shim.compute_policy_loss_ess_seq, whole, [rows(whole, s) for s in SPLIT], mode)


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_sum_to_whole_on_policy(mode: str) -> None:
    """Property: for on-policy data (log_prob == old_log_prob, verl's first update of a step)
    every call has ESS == 1, so with ``ess`` (call scope) the micro-batch losses and gradients
    sum exactly to the whole mini-batch's."""
    whole = make_batch(seed=5, drift=0.0)
    parts = [rows(whole, s) for s in SPLIT]
    for part in parts:
        assert float(run(shim.compute_policy_loss_ess, part, mode, None)[2]["actor/ess"]) == 1.0
    _split_vs_whole(shim.compute_policy_loss_ess, whole, parts, mode)


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_sum_to_whole_equal_ess(mode: str) -> None:
    """Property: if every micro-batch has the same ESS as the whole mini-batch (here: the
    mini-batch is two copies of one micro-batch, and ESS = (Σw)² / (n Σw²) is invariant under
    replication), then with ``ess`` (call scope) and off-policy data the micro-batch losses and
    gradients sum to the whole mini-batch's."""
    half = make_batch(batch_size=4, seed=6)
    whole = cat(half, half)
    _split_vs_whole(shim.compute_policy_loss_ess, whole, [half, half], mode)


@pytest.mark.parametrize("mode", MODES)
def test_dp_emulation_sequence_scope(mode: str) -> None:
    """Property: with dp_size = R ranks each holding 1/R of the mini-batch, averaging the ranks'
    gradients (what DDP/FSDP do) equals the single-rank gradient of the whole mini-batch
    (``ess_seq``; the ESS all-reduce of ``ess`` is covered by the gloo test)."""
    whole = make_batch(seed=7)
    loss_w, grad_w, _ = run(
        shim.compute_policy_loss_ess_seq, whole, mode, {"global_batch_info": global_info(whole)}
    )
    info = global_info(whole, dp_size=2)
    r0, r1 = (
        run(shim.compute_policy_loss_ess_seq, rows(whole, s), mode, {"global_batch_info": info})
        for s in (slice(0, 3), slice(3, 6))
    )
    assert_close((r0[0] + r1[0]) / 2, loss_w)
    assert_close(torch.cat([r0[1], r1[1]]) / 2, grad_w)


# ----------------------------------------------------------------------------- weights / metrics


def test_rollout_is_weights_are_applied() -> None:
    """On-policy (ESS = 1, no regulariser): the gradient is -A * c / N per valid token, so
    the weights c enter linearly and are not differentiated."""
    batch = make_batch(seed=8, drift=0.0)
    cfg = {"global_batch_info": global_info(batch)}
    _, grad_c, _ = run(shim.compute_policy_loss_ess, batch, "token-mean", cfg, weights=True)
    _, grad_1, _ = run(shim.compute_policy_loss_ess, batch, "token-mean", cfg, weights=False)
    mask = batch["response_mask"]
    n = mask.sum()
    assert_close(grad_1, torch.where(mask, -batch["advantages"] / n, 0.0))
    assert_close(
        grad_c, torch.where(mask, -batch["advantages"] * batch["rollout_is_weights"] / n, 0.0)
    )


def test_metrics_are_detached_scalar_tensors_verl_accepts() -> None:
    """Metrics carry verl's ``actor/`` prefix, are detached 0-dim tensors (no host sync in the
    loss), and verl's ``Metric.from_dict`` (what ``ppo_loss`` applies) turns them into floats."""
    from verl.utils.metric import AggregationType, Metric

    batch = make_batch(seed=9)
    _, _, metrics = run(shim.compute_policy_loss_ess, batch, "token-mean", None)
    assert set(metrics) == {
        "actor/ess",
        "actor/ess_min",
        "actor/ess_capped_frac",
        "actor/ess_capped_mass",
        "actor/ess_kl_behavior",
        "actor/ess_ratio_mean",
        "actor/ess_ratio_max",
        "actor/ess_ratio_min",
    }
    for value in metrics.values():
        assert isinstance(value, torch.Tensor) and value.ndim == 0 and not value.requires_grad
    wrapped = Metric.from_dict(metrics, aggregation=AggregationType.MEAN)
    for key, metric in wrapped.items():
        assert isinstance(metric.aggregate(), float)
        assert metric.aggregate() == pytest.approx(float(metrics[key]))


@pytest.mark.parametrize("fn", ["compute_policy_loss_ess", "compute_policy_loss_ess_seq"])
def test_capped_mass_and_ratio_min_against_naive_formula(fn: str) -> None:
    """``actor/ess_capped_mass`` = sum(w - min(w, ESS)) / sum(w) and ``actor/ess_ratio_min`` =
    min(w) over the valid tokens, from a float64 formula independent of the core (call scope;
    with ``ess_seq`` each sequence is capped at its own ESS). Mutations that fail it: the two
    ``capped_frac`` logged under ``ess_capped_mass``; ``ratio_max`` under ``ess_ratio_min``."""
    batch = make_batch(seed=11, drift=0.8)
    _, _, metrics = run(getattr(shim, fn), batch, "token-mean", None)
    mask = batch["response_mask"]
    w = (batch["log_prob"] - batch["old_log_prob"]).double().exp().where(mask, 0.0)
    if fn == "compute_policy_loss_ess":
        cap = w.sum() ** 2 / (mask.sum() * (w**2).sum())
    else:  # one ESS per non-empty row; empty rows hold no ratio mass
        cap = (w.sum(-1) ** 2 / (mask.sum(-1) * (w**2).sum(-1)).clamp(min=1e-300))[:, None]
    rho = torch.minimum(w, cap.expand_as(w))
    mass = float(((w - rho) * mask).sum() / w.sum())
    assert 0.05 < mass < 0.95  # the cap removes a visible share, not all of it
    assert float(metrics["actor/ess_capped_mass"]) == pytest.approx(mass, rel=1e-5)
    assert float(metrics["actor/ess_ratio_min"]) == pytest.approx(float(w[mask].min()), rel=1e-5)
    assert float(metrics["actor/ess_ratio_min"]) < 1.0 < float(metrics["actor/ess_ratio_max"])


@pytest.mark.parametrize("mode", MODES)
def test_empty_micro_batch_is_finite(mode: str) -> None:
    """A micro-batch with no valid token (all masked, or no rows: verl pads ranks to the same
    micro-batch count) gives loss 0 and gradient 0, with or without global batch info, where
    verl's own ``agg_loss`` divides 0 by a count of 0 (NaN) for local normalisation."""
    full = make_batch(batch_size=2, seed=14)
    masked = {**full, "response_mask": torch.zeros_like(full["response_mask"])}
    for batch in (masked, rows(full, slice(0, 0))):
        for info in ({}, {"dp_size": 2, "batch_num_tokens": 9, "global_batch_size": 4}):
            loss, grad, _ = run(
                shim.compute_policy_loss_ess, batch, mode, {"global_batch_info": info}
            )
            assert_close(loss, torch.zeros((), dtype=loss.dtype))
            assert_close(grad, torch.zeros_like(grad))
        token_loss = torch.zeros_like(batch["log_prob"])
        unguarded = core_algos.agg_loss(token_loss, batch["response_mask"], mode)
        assert torch.isnan(unguarded) == (mode != "token-sum")


def test_errors_name_the_fix() -> None:
    batch = make_batch(seed=10)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        run(shim.compute_policy_loss_ess, batch, "seq-sum", None)
    with pytest.raises(ValueError, match="batch_num_tokens"):
        run(
            shim.compute_policy_loss_ess, batch, "token-mean", {"global_batch_info": {"dp_size": 2}}
        )
    with pytest.raises(ValueError, match="global_batch_size"):
        run(
            shim.compute_policy_loss_ess,
            batch,
            "seq-mean-token-mean",
            {"global_batch_info": {"dp_size": 2}},
        )


# ----------------------------------------------------------------------------- verl config / path


@pytest.fixture(scope="module")
def actor_config() -> Any:
    """An ``ActorConfig`` built the way verl's worker builds it (hydra ``_target_`` instantiation
    of the ``actor_rollout_ref.actor`` DictConfig via ``omega_conf_to_dataclass``)."""
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import ActorConfig, PolicyLossConfig

    cfg = OmegaConf.create(
        {
            "_target_": "verl.workers.config.ActorConfig",
            "strategy": "fsdp",
            "rollout_n": 2,
            "ppo_mini_batch_size": 3,
            "ppo_micro_batch_size_per_gpu": 2,
            "loss_agg_mode": "seq-mean-token-mean",
            "policy_loss": {"_target_": "verl.workers.config.PolicyLossConfig", "loss_mode": "ess"},
        }
    )
    config = omega_conf_to_dataclass(cfg)
    assert isinstance(config, ActorConfig) and isinstance(config.policy_loss, PolicyLossConfig)
    return config


@pytest.mark.parametrize("kind", ["ActorConfig", "DictConfig", "dict"])
def test_config_objects(actor_config: Any, kind: str) -> None:
    """ActorConfig, DictConfig and plain dict configs give identical results."""
    from omegaconf import OmegaConf

    batch = make_batch(seed=11)
    info = global_info(batch, dp_size=2)
    reference = run(shim.compute_policy_loss_ess, batch, "token-mean", {"global_batch_info": info})
    if kind == "ActorConfig":
        actor_config.global_batch_info.clear()
        actor_config.global_batch_info.update(info)
        config: Any = actor_config
    elif kind == "DictConfig":
        config = OmegaConf.create({"loss_agg_mode": "token-mean", "global_batch_info": info})
    else:
        config = {"global_batch_info": info}
    loss, grad, _ = run(shim.compute_policy_loss_ess, batch, "token-mean", config)
    assert_close(loss, reference[0])
    assert_close(grad, reference[1])


def test_verl_ppo_loss_end_to_end(actor_config: Any) -> None:
    """verl's own actor loss (``verl.workers.utils.losses.ppo_loss``) dispatches to the shim via
    ``policy_loss.loss_mode=ess``, fills ``global_batch_info`` itself and accepts the metrics."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    batch = make_batch(seed=12, dtype=torch.float32)
    bsz, horizon = batch["response_mask"].shape
    # Padded (non-nested) layout: 1 prompt token + T response tokens per sequence; the model's
    # log-prob of response token t sits at flat position offset + t (verl shifts by one).
    log_prob = batch["log_prob"].clone().requires_grad_(True)
    flat = torch.cat([log_prob, torch.zeros(bsz, 1)], dim=1).reshape(-1)
    data = tu.get_tensordict(
        {
            "prompts": torch.ones(bsz, 1, dtype=torch.long),
            "responses": torch.ones(bsz, horizon, dtype=torch.long),
            "attention_mask": torch.ones(bsz, 1 + horizon, dtype=torch.long),
            "response_mask": batch["response_mask"],
            "old_log_probs": batch["old_log_prob"],
            "advantages": batch["advantages"],
            "rollout_is_weights": batch["rollout_is_weights"],
        },
        non_tensor_dict={
            "dp_size": 1,
            "batch_num_tokens": int(batch["response_mask"].sum()),
            "global_batch_size": bsz,
        },
    )
    loss, metrics = ppo_loss(actor_config, {"log_probs": flat}, data)
    (grad,) = torch.autograd.grad(loss, log_prob)
    assert metrics["actor/ess"].aggregate() == pytest.approx(metrics["actor/ess"].values[0])

    expected = run(
        shim.compute_policy_loss_ess,
        batch,
        "seq-mean-token-mean",
        {"global_batch_info": global_info(batch)},
    )
    assert_close(loss.detach(), expected[0])
    assert_close(grad, expected[1])


# ----------------------------------------------------------------------------- dp_size > 1 (gloo)

_GLOO_WORKER = """
    import os, sys, torch, torch.distributed as dist
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from verl.trainer.ppo.core_algos import get_policy_loss_fn
    shard = torch.load(os.path.join(out_dir, f"shard{rank}.pt"))
    info = torch.load(os.path.join(out_dir, "info.pt"))
    log_prob = shard["log_prob"].clone().requires_grad_(True)
    loss, metrics = get_policy_loss_fn("ess")(
        old_log_prob=shard["old_log_prob"], log_prob=log_prob, advantages=shard["advantages"],
        response_mask=shard["response_mask"], loss_agg_mode=info.pop("mode"),
        config={"global_batch_info": info}, rollout_is_weights=shard["rollout_is_weights"])
    loss.backward()
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach().to(torch.float32))
    torch.save({"grad": log_prob.grad, "ess": metrics["actor/ess"], "loss_mean": sum(losses) / world},
               os.path.join(out_dir, f"out{rank}.pt"))
    dist.destroy_process_group()
    print("ok")
"""


def run_two_gloo_ranks(script: str, tmp_path: Path, timeout: int = 240) -> None:
    """Run ``script`` (Python source) as ranks 0 and 1 of a gloo group
    (:func:`ess_po.testing.processes.run_ranks`) with ``tmp_path`` as its argument."""
    (tmp_path / "worker.py").write_text(script)
    run_ranks(tmp_path / "worker.py", 2, [tmp_path], timeout=timeout, cwd=REPO)


@pytest.mark.slow
def test_gloo_two_ranks_match_single_process(tmp_path: Path) -> None:
    """Property: two data-parallel ranks (gloo), each with half of an off-policy mini-batch and
    verl's global batch info (dp_size=2): ESS is all-reduced, so each rank's ``actor/ess`` equals
    the whole mini-batch's ESS and the rank-averaged loss and gradients (DDP's reduction) equal the
    single-process loss and gradient of the whole mini-batch with ``ess`` (call scope)."""
    mode = "token-mean"
    whole = make_batch(batch_size=6, seed=13)
    halves = [rows(whole, slice(0, 3)), rows(whole, slice(3, 6))]
    for r, half in enumerate(halves):
        torch.save(half, tmp_path / f"shard{r}.pt")
    torch.save({**global_info(whole, dp_size=2), "mode": mode}, tmp_path / "info.pt")

    run_two_gloo_ranks(textwrap.dedent(_GLOO_WORKER), tmp_path)

    loss_w, grad_w, metrics_w = run(
        shim.compute_policy_loss_ess, whole, mode, {"global_batch_info": global_info(whole)}
    )
    outs = [torch.load(tmp_path / f"out{r}.pt") for r in range(2)]
    for out in outs:
        assert_close(out["ess"], metrics_w["actor/ess"])
    assert_close(outs[0]["loss_mean"], loss_w.float())
    assert_close(torch.cat([outs[0]["grad"], outs[1]["grad"]]) / 2, grad_w)
