"""Step scope in verl (issue 15): ``loss_mode=ess_step`` with the opt-in pre-pass worker.

One subprocess (``tests/verl/verl_actor_worker.py OUT step``) drives verl 0.9.1's FSDP2 actor on
the CPU (workarounds: ``ess_po.testing.verl_harness``) with the policy frozen (lr 0) and known
log-ratio offsets, so the same 2 optimizer steps of 8 sequences are trained with
``ppo_micro_batch_size_per_gpu`` = 1, 2, 4 and 8. With ``ess_step`` the pre-pass computes one
ESS per optimizer step, so the gradient of each step is the same for every split; with ``ess``
(one ESS per call) it is not. The worker also times each update (3 repeats; the cost figures
come from ``benchmarks/verl_step_cost.py``). 2 ranks of verl's actor: ``test_verl_step_ranks.py``.
``test_step_scope_two_ranks_equal_one_process`` runs the pre-pass's statistics step (merge and
all-reduce) and ``ess_step`` on 2 gloo processes, without verl's actor.

Free path (``free_record``, ``tests/verl/verl_actor_worker.py OUT free``): verl recomputes
``old_log_prob`` with the actor, lr 2e-2; the first optimizer step of the update takes its
statistics without a forward, the second runs the pre-pass; rollout-correction bypass mode, a
second update without recompute and edited old log-probs always run the pre-pass.

Mutations checked (free path):

* the free path forced on every mini-batch (``free = True`` in ``StepScope.attach``'s
  ``train_batch_with_step_stats``) fails ``test_free_path_on_the_first_mini_batch_only``
  (0 pre-pass forwards, the second step logs ESS 1), ``test_free_path_equals_the_prepass``
  (second step's ESS 1 instead of 0.9071 from the calls' log-probs) and
  ``test_free_path_not_taken_in_bypass_mode_or_without_recompute``;
* the sequence digest without the log-prob values (``values[i][valid]`` dropped from
  ``free_path.sequence_digests``: only tokens and positions compared) fails
  ``test_free_path_not_taken_in_bypass_mode_or_without_recompute``,
  ``test_free_path_not_taken_with_edited_old_log_prob`` and
  ``test_free_path_equals_the_prepass`` (the bypass run claims ESS 1).

Mutation checked: the ``ess_step`` loss (``losses.make_policy_loss``) passing ``stats=None`` and
``ess_scope="call"`` (each call's own ESS instead of the pre-pass statistics) fails ``test_step_scope_gradient_is_invariant_to_the_split``
(micro-batches of 1 vs 8: 13% relative gradient difference) and
``test_step_scope_uses_one_ess_per_optimizer_step``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close
from verl_actor_worker import run_actor_worker

from ess_po.testing.processes import child_env

pytest.importorskip("verl.trainer.ppo.core_algos")
pytest.importorskip("ess_po.integrations.verl")
for _module in ("uvicorn", "fastapi", "torchdata", "cachetools", "hydra"):
    pytest.importorskip(_module)

REPO = Path(__file__).resolve().parents[2]
MICROS = (1, 2, 4, 8)


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("verl_step")
    return run_actor_worker(out, "step", timeout=900)


def _ess(log_ratio: torch.Tensor, mask: torch.Tensor) -> float:
    w = log_ratio.double().exp()[mask.bool()]
    return float(w.sum() ** 2 / (w.numel() * (w**2).sum()))


def _relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = max(float((a[k] - b[k]).abs().max()) for k in a)
    return num / max(float(b[k].abs().max()) for k in b)


@pytest.mark.slow
def test_step_scope_uses_one_ess_per_optimizer_step(record: dict) -> None:
    """Every call of a step reports the ESS of the step's 8 sequences, predicted in float64 from
    the known offsets (independently of the core), for every micro-batch size."""
    offsets, mask = record["offsets"], record["response_mask"]
    expected = [_ess(offsets[:8], mask[:8]), _ess(offsets[8:], mask[8:])]
    for key in [f"ess_step_micro{m}_fp32" for m in MICROS] + ["ess_step_micro1_bf16"]:
        expected_dtype = "torch.float32" if key.endswith("fp32") else "torch.bfloat16"
        assert {c["log_prob_dtype"] for c in record["runs"][key]["calls"]} == {expected_dtype}
        micro = record["runs"][key]["micro"]
        calls = record["runs"][key]["calls"]
        per_step = 8 // micro
        assert len(calls) == 2 * per_step
        for i, call in enumerate(calls):
            assert call["metrics"]["actor/ess"] == pytest.approx(expected[i // per_step], abs=2e-3)


@pytest.mark.slow
def test_step_scope_gradient_is_invariant_to_the_split(record: dict) -> None:
    """In fp32 compute the gradient of each optimizer step is the same for micro-batches of 1,
    2, 4 and 8 sequences (float32 accumulation tolerance). Under verl's default bf16 compute the
    split still changes the rounding of the forward and backward passes: 1 vs 8 stays within 1%
    (per-call scope: over 5%, next test)."""
    reference = record["runs"]["ess_step_micro8_fp32"]["grads"]
    for micro in MICROS[:-1]:
        grads = record["runs"][f"ess_step_micro{micro}_fp32"]["grads"]
        for step in range(2):
            for name, grad in grads[step].items():
                assert_close(grad, reference[step][name], rtol=1e-5, atol=1e-7)
    one, eight = (record["runs"][f"ess_step_micro{m}_bf16"]["grads"] for m in (1, 8))
    for step in range(2):
        assert _relative_difference(one[step], eight[step]) < 1e-2


@pytest.mark.slow
def test_per_call_scope_gradient_depends_on_the_split(record: dict) -> None:
    """Contrast: with ``ess`` (one ESS per call) the same steps give different gradients for
    micro-batches of 1 and 8 sequences; with 8 (one call per step) they equal ``ess_step``'s."""
    for dtype in ("fp32", "bf16"):
        one, eight = (record["runs"][f"ess_micro{m}_{dtype}"]["grads"] for m in (1, 8))
        for step in range(2):
            assert _relative_difference(one[step], eight[step]) > 5e-2
    eight = record["runs"]["ess_micro8_fp32"]["grads"]
    step8 = record["runs"]["ess_step_micro8_fp32"]["grads"]
    for step in range(2):
        for name, grad in eight[step].items():
            assert_close(grad, step8[step][name], rtol=1e-5, atol=1e-7)


_ENV_PROBE = """
import sys
sys.modules["trl"] = None  # verl's actor cannot start next to TRL 1.16 (test_verl_trl_guard.py)
import torch
import verl  # loads the plugin, which reads ESS_PO_VERL_STEP_SCOPE
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.workers.engine_workers import ActorRolloutRefWorker
print("worker", ActorRolloutRefWorker.actor_worker_cls.__name__)
try:
    get_policy_loss_fn("ess_step")(
        old_log_prob=torch.zeros(1, 2), log_prob=torch.zeros(1, 2),
        advantages=torch.zeros(1, 2), response_mask=torch.ones(1, 2))
except ValueError as exc:
    print("error", exc)
"""


@pytest.mark.slow
def test_env_var_installs_the_step_worker_and_ess_step_needs_it() -> None:
    """``ESS_PO_VERL_STEP_SCOPE=1`` in a worker's environment makes ``import verl`` (through the
    plugin) install the pre-pass worker; ``ess_step`` without step statistics raises a
    ValueError naming the fix. Without the variable verl's own worker class stays."""
    env = child_env(ESS_PO_VERL_STEP_SCOPE=None)
    outs = {}
    for flag in ("1", ""):
        proc = subprocess.run(
            [sys.executable, "-c", _ENV_PROBE],
            env={**env, "ESS_PO_VERL_STEP_SCOPE": flag},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[flag] = proc.stdout
    assert "worker ESSStepTrainingWorker" in outs["1"]
    assert "worker TrainingWorker" in outs[""]
    assert "error policy_loss.loss_mode=ess_step needs" in outs["1"]
    assert "ESS_PO_VERL_STEP_SCOPE=1" in outs["1"]


# ----------------------------------------------------------------------------- 2 ranks (gloo)

_TWO_RANK_WORKER = """
import os, sys, torch, torch.distributed as dist
out_dir = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()
import ess_po.integrations.verl as shim
from verl.trainer.ppo.core_algos import get_policy_loss_fn

loss_fn = get_policy_loss_fn("ess_step")
shard = torch.load(os.path.join(out_dir, f"shard{rank}.pt"))
info = torch.load(os.path.join(out_dir, "info.pt"))
mask, result = shard["response_mask"], {}
for micro in (1, 2, 4):
    # What the pre-pass worker does with this rank's mini-batch (its log-probs come from a
    # no-grad forward there): the statistics of the rank's share, all-reduced, for every call.
    scope = shim._SCOPE
    stats = scope.rank_stats(shard["log_prob"] - shard["old_log_prob"], mask)
    log_prob = shard["log_prob"].clone().requires_grad_(True)
    ess = []
    with scope.active(stats):
        for start in range(0, mask.shape[0], micro):
            sl = slice(start, start + micro)
            loss, metrics = loss_fn(
                old_log_prob=shard["old_log_prob"][sl], log_prob=log_prob[sl],
                advantages=shard["advantages"][sl], response_mask=mask[sl],
                loss_agg_mode="token-mean", config={"global_batch_info": info},
                rollout_is_weights=shard["rollout_is_weights"][sl])
            loss.backward()
            ess.append(metrics["actor/ess"])
    result[micro] = {"grad": log_prob.grad, "ess": torch.stack(ess)}
torch.save(result, os.path.join(out_dir, f"out{rank}.pt"))
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_step_scope_two_ranks_equal_one_process(tmp_path: Path) -> None:
    """Two data-parallel ranks (gloo processes), each with half of an off-policy mini-batch of 8
    sequences (one fully masked) split into micro-batches of 1, 2 and 4: with ``ess_step`` and
    the statistics the pre-pass worker computes (``StepScope.rank_stats``), every call on both ranks
    reports the ESS of all 8 sequences (float64 formula, independent of the core), and the
    rank-averaged gradient (DDP's reduction) equals one ``ess`` call over the whole mini-batch
    in one process. Each half's own ESS differs from the whole's, so a rank that skipped the
    all-reduce would be caught. Mutation checked: ``sync=False`` in ``StepScope.rank_stats``
    (no all-reduce) fails it."""
    from test_verl_shim import global_info, make_batch, rows, run, run_two_gloo_ranks

    shim = pytest.importorskip("ess_po.integrations.verl")
    whole = make_batch(batch_size=8, horizon=7, seed=21, drift=0.6)
    halves = [rows(whole, slice(0, 4)), rows(whole, slice(4, 8))]
    for r, half in enumerate(halves):
        torch.save(half, tmp_path / f"shard{r}.pt")
    torch.save(global_info(whole, dp_size=2), tmp_path / "info.pt")
    run_two_gloo_ranks(_TWO_RANK_WORKER, tmp_path)

    log_ratio = lambda b: b["log_prob"] - b["old_log_prob"]  # noqa: E731
    expected = _ess(log_ratio(whole), whole["response_mask"])
    for half in halves:
        assert abs(_ess(log_ratio(half), half["response_mask"]) - expected) > 1e-2
    _, grad_whole, metrics = run(
        shim.compute_policy_loss_ess, whole, "token-mean", {"global_batch_info": global_info(whole)}
    )
    assert float(metrics["actor/ess"]) == pytest.approx(expected, rel=1e-6)
    outs = [torch.load(tmp_path / f"out{r}.pt") for r in range(2)]
    for micro in (1, 2, 4):
        for out in outs:
            assert out[micro]["ess"].tolist() == pytest.approx([expected] * (4 // micro), rel=1e-6)
        assert_close(torch.cat([out[micro]["grad"] for out in outs]) / 2, grad_whole)


# ----------------------------------------------------------------------------- free path

FREE_MICROS = (1, 2, 4, 8)


@pytest.fixture(scope="module")
def free_record(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("verl_free")
    return run_actor_worker(out, "free", timeout=900)


def _free_flags(run: dict) -> list[float]:
    return [call["metrics"]["actor/ess_step_free"] for call in run["calls"]]


@pytest.mark.slow
def test_free_path_on_the_first_mini_batch_only(free_record: dict) -> None:
    """verl recomputes ``old_log_prob`` with the actor, then updates (lr 2e-2, 2 optimizer steps
    of 8 sequences): with the free path allowed, the first optimizer step runs no pre-pass
    forward (counted on the engine) and every call of it has ESS 1 exactly; the second step (the
    parameters moved) runs one pre-pass forward, with ESS < 1. ``free_path=False`` runs a
    pre-pass forward before each of the 2 steps. ``actor/ess_step_free`` logs the branch."""
    for micro in FREE_MICROS:
        run = free_record["runs"][f"free_micro{micro}_fp32"]
        per_step = 8 // micro
        assert run["prepass_forwards"] == 1, micro
        assert _free_flags(run) == [1.0] * per_step + [0.0] * per_step
        ess = [call["metrics"]["actor/ess"] for call in run["calls"]]
        assert ess[:per_step] == [1.0] * per_step
        assert max(ess[per_step:]) < 0.95  # the first step moved the policy
    for micro in (1, 8):
        run = free_record["runs"][f"prepass_micro{micro}_fp32"]
        assert run["prepass_forwards"] == 2
        assert _free_flags(run) == [0.0] * (16 // micro)


@pytest.mark.slow
def test_free_path_equals_the_prepass(free_record: dict) -> None:
    """With the same micro-batch size (1 or 8 sequences), each optimizer step's gradient with the
    free path equals the always-pre-pass run's (fp32, float32 accumulation tolerance; also bf16
    compute with 8), and every call's ESS equals the pre-pass run's. Across micro-batches of 1,
    2, 4 and 8 with the free path the step gradients stay within 1e-5 (relative max-abs) of the
    pre-pass run with 8: the split invariance holds (the second step inherits the first step's
    float32 rounding, amplified by AdamW's normalisation; 1.2e-6 measured for 1 vs 8). Every
    call's ESS also equals the ESS of its step, computed in float64 from the log-probs that the
    step's loss calls received (independent of the plugin's statistics)."""
    for key, run in free_record["runs"].items():
        calls = run["calls"]
        per_step = len(calls) // 2
        for step in range(2):
            part = calls[step * per_step : (step + 1) * per_step]
            log_ratio = torch.cat([c["log_prob"] - c["old_log_prob"] for c in part])
            expected = _ess(log_ratio, torch.cat([c["response_mask"] for c in part]))
            for call in part:
                assert call["metrics"]["actor/ess"] == pytest.approx(expected, abs=1e-5), key
    for dtype, micro in (("fp32", 1), ("fp32", 8), ("bf16", 8)):
        reference = free_record["runs"][f"prepass_micro{micro}_{dtype}"]
        run = free_record["runs"][f"free_micro{micro}_{dtype}"]
        ess = [call["metrics"]["actor/ess"] for call in run["calls"]]
        assert ess == pytest.approx([c["metrics"]["actor/ess"] for c in reference["calls"]], 1e-6)
        for step in range(2):
            for name, grad in run["grads"][step].items():
                assert_close(grad, reference["grads"][step][name], rtol=1e-5, atol=1e-7)
    reference = free_record["runs"]["prepass_micro8_fp32"]["grads"]
    for micro in FREE_MICROS:
        grads = free_record["runs"][f"free_micro{micro}_fp32"]["grads"]
        for step in range(2):
            assert _relative_difference(grads[step], reference[step]) < 1e-5, (micro, step)


@pytest.mark.slow
def test_free_path_not_taken_in_bypass_mode_or_without_recompute(free_record: dict) -> None:
    """Rollout-correction bypass mode (v1 trainer: old_log_prob = rollout log-probs, the actor's
    recompute ran but its output is not used): a pre-pass forward before both optimizer steps
    and ESS < 1 on the first, where a free path would have claimed 1. A second update of the
    same batch without a recompute (the parameters moved): pre-pass before both steps too. In
    the off-policy runs of ``tests/verl/verl_actor_worker.py OUT step`` (old_log_prob = recomputed
    minus offsets) the free path is never taken either (see the next test)."""
    bypass = free_record["runs"]["bypass_micro2_fp32"]
    assert bypass["prepass_forwards"] == 2
    assert _free_flags(bypass) == [0.0] * 8
    mask = free_record["response_mask"].bool()
    for call, rows in zip(bypass["calls"], range(0, 16, 2), strict=True):
        old = call["old_log_prob"][call["response_mask"].bool()]
        assert_close(old, bypass["rollout_log_probs"][rows : rows + 2][mask[rows : rows + 2]])
    assert bypass["calls"][0]["metrics"]["actor/ess"] < 0.99
    again = free_record["runs"]["again_micro2_fp32"]
    assert again["prepass_forwards"] == 2
    assert _free_flags(again) == [0.0] * 8
    assert again["calls"][0]["metrics"]["actor/ess"] < 0.99


@pytest.mark.slow
def test_free_path_not_taken_with_edited_old_log_prob(record: dict) -> None:
    """The step-scope runs above hand verl's recomputed log-probs minus known offsets to the
    update (lr 0, so the parameters never change): those are not what the actor produced, so
    every optimizer step runs the pre-pass (``actor/ess_step_free`` 0 on every call)."""
    for key, run in record["runs"].items():
        if key.startswith("ess_step"):
            assert {call["metrics"]["actor/ess_step_free"] for call in run["calls"]} == {0.0}
