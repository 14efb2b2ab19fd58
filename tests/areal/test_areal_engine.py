"""The ESS objective inside AReaL 1.0.4's own FSDP2 actor engine (gloo, CPU), against AReaL's
GRPO loss and a naive float64 reference trained through the same engine.

Opt-in: runs in the environment ``.ci/areal.sh`` builds; skipped where AReaL does not import,
unless ``ESS_PO_REQUIRE_AREAL=1`` (set there) turns the skip into an error. Each fixture runs one
scenario of ``tests/areal/areal_worker.py`` under torchrun (12-20 s each); the tests read what it
recorded. Batch: 8 sequences of 7-13 tokens (packed micro-batches of 25 and 21 valid tokens),
rewards of mixed sign (advantages = rewards, ``adv_norm=None``), ``kl_ctl=0``; off-policy means behaviour log-probs = recomputed + 0.5 N(0, 1)
on the response tokens, AReaL's decoupled mode (``use_decoupled_loss=True``).

Mutations checked (each made once by hand, the named test failed, then reverted):

* ``ESSLoss`` returning the micro-batch's token *sum* instead of its mean ->
  ``test_on_policy_gradients_equal_areal_grpo`` (and the reference tests) fail.
* ``ESSPPOActor.step_statistics`` not all-reducing over the data-parallel group ->
  ``test_ess_and_gradients_do_not_depend_on_the_layout`` fails.
* ``ESSPPOActor.step_statistics`` always taking the free path ->
  ``test_second_step_statistics_come_from_a_forward`` fails.
* ``ESSLoss`` taking ``prox_logp`` as the behaviour log-probs -> the off-policy tests fail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ess_po.testing.requirements import require

# the imports below need AReaL: they follow the skip (E402 on purpose)
require("areal", "ESS_PO_REQUIRE_AREAL", "AReaL tests need its environment: run .ci/areal.sh")

import torch  # noqa: E402
from areal_worker import run_worker  # noqa: E402

from ess_po.testing.processes import RanksFailed  # noqa: E402
from ess_po.testing.reference import naive_ess  # noqa: E402

pytestmark = pytest.mark.slow
UPDATE = "ppo_actor/update/"


def rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference over all parameters' gradients, over b's largest entry."""
    assert a.keys() == b.keys()
    num = max(float((a[k] - b[k]).abs().max()) for k in a)
    return num / max(float(b[k].abs().max()) for k in b)


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("areal")


def _run(out: Path, name: str, scenario: str, nprocs: int, *extra: str) -> list[dict[str, Any]]:
    path = out / name
    path.mkdir()
    return run_worker(scenario, path, nprocs, *extra)


@pytest.fixture(scope="module")
def grad(out: Path) -> dict[str, Any]:
    return _run(out, "grad", "grad", 1)[0]


@pytest.fixture(scope="module")
def layouts(out: Path) -> dict[int, list[dict[str, Any]]]:
    return {1: _run(out, "layout1", "layout", 1), 2: _run(out, "layout2", "layout", 2)}


# --- on-policy: AReaL's GRPO loss and the ESS objective coincide ----------------------------


@pytest.mark.parametrize("tag", ["ess_step", "ess_step_prepass", "ess_call"])
def test_on_policy_gradients_equal_areal_grpo(grad: dict[str, Any], tag: str) -> None:
    """recompute_logprob, not decoupled, one mini-batch of two packed micro-batches of unequal
    token counts: ``d = 0`` exactly, ESS = 1, and the gradient is AReaL's GRPO gradient (token
    mean over the step, mixed-sign advantages)."""
    assert rel(grad[f"grad/{tag}_on"], grad["grad/grpo_on"]) <= 1e-6
    steps = grad[f"steps/{tag}_on"]
    assert [s["loss"] for s in steps] == ["ESSLoss"]  # AReaL's partial(grpo_loss_fn) swapped
    assert len(steps[0]["calls"]) == 2
    if tag != "ess_call":
        assert float(steps[0]["ess"]) == 1.0
        assert steps[0]["free"] is (tag == "ess_step")
    assert grad[f"stats/{tag}_on"][UPDATE + "ess"] == 1.0


# --- off-policy: the ESS objective as written, through the engine ---------------------------


@pytest.mark.parametrize("tag", ["ess_step", "ess_step_prepass"])
def test_off_policy_step_gradient_equals_the_reference(grad: dict[str, Any], tag: str) -> None:
    """Decoupled mode: the gradient equals the naive float64 formula with the step's ESS, and
    differs from AReaL's decoupled GRPO gradient (relative difference measured 0.423)."""
    assert rel(grad[f"grad/{tag}_off"], grad["grad/ref_step_off"]) <= 1e-5
    assert rel(grad[f"grad/{tag}_off"], grad["grad/grpo_off"]) >= 0.1


def test_off_policy_call_gradient_equals_the_reference(grad: dict[str, Any]) -> None:
    """``ess_scope="call"``: one ESS per micro-batch (0.430 from AReaL's GRPO, measured)."""
    assert rel(grad["grad/ess_call_off"], grad["grad/ref_call_off"]) <= 1e-5
    assert rel(grad["grad/ess_call_off"], grad["grad/grpo_off"]) >= 0.1
    assert rel(grad["grad/ess_call_off"], grad["grad/ess_step_off"]) >= 1e-3


def test_step_ess_is_the_naive_ess_of_the_step(grad: dict[str, Any]) -> None:
    naive = float(grad["ess_naive_off"])
    assert naive < 0.9  # stale enough for the cap and the regulariser to act
    for tag in ("ess_step", "ess_step_prepass"):
        (step,) = grad[f"steps/{tag}_off"]
        assert float(step["ess"]) == pytest.approx(naive, rel=1e-6)
        # the statistics are those of what the loss calls received
        calls = step["calls"]
        seen = float(
            naive_ess(
                torch.cat([c["logprobs"] - c["old"] for c in calls]),
                torch.cat([c["mask"] for c in calls]),
            )
        )
        assert seen == pytest.approx(naive, rel=1e-6)


def test_ess_metrics_follow_areal_stats_tracker(grad: dict[str, Any]) -> None:
    """The diagnostics are exported by AReaL's tracker under ``ppo_actor/update/ess*``; the
    token-level ones equal their definitions on the tokens the loss calls received."""
    stats = grad["stats/ess_step_off"]
    (step,) = grad["steps/ess_step_off"]
    ess = float(step["ess"])
    d = torch.cat([c["logprobs"] - c["old"] for c in step["calls"]]).double()
    m = torch.cat([c["mask"] for c in step["calls"]]).bool()
    w = d.exp()[m]
    assert stats[UPDATE + "ess"] == pytest.approx(ess, rel=1e-6)
    assert stats[UPDATE + "ess_min"] == pytest.approx(ess, rel=1e-6)
    assert stats[UPDATE + "ess_capped_frac"] == pytest.approx(float((w > ess).double().mean()))
    # capped mass: a ratio of sums per call, exported as the token-weighted mean over the calls
    masses, counts = [], []
    for c in step["calls"]:
        wc = (c["logprobs"] - c["old"]).double().exp()[c["mask"].bool()]
        masses.append(float((wc - torch.clamp(wc, max=ess)).sum() / wc.sum()))
        counts.append(wc.numel())
    capped_mass = sum(x * n for x, n in zip(masses, counts, strict=True)) / sum(counts)
    assert stats[UPDATE + "ess_capped_mass"] == pytest.approx(capped_mass, rel=1e-5)
    k3 = d[m] + torch.expm1(-d[m])
    assert stats[UPDATE + "ess_kl_behavior"] == pytest.approx(float(k3.mean()), rel=1e-5)
    assert stats[UPDATE + "ess_ratio_max"] == pytest.approx(float(w.max()), rel=1e-5)
    assert stats[UPDATE + "ess_ratio_min"] == pytest.approx(float(w.min()), rel=1e-5)
    assert stats[UPDATE + "ess_step_free"] == 1.0
    # AReaL's own per-token names, as its GRPO loss logs them
    for key in ("importance_weight/avg", "approx_kl/avg", "actor_loss/avg", "entropy/avg"):
        assert UPDATE + key in stats
    assert stats[UPDATE + "importance_weight/avg"] == pytest.approx(float(w.mean()), rel=1e-5)
    # the staleness of the tokens (current_version from AReaL's loss keywords)
    assert UPDATE + "version_stats/sample_staleness_theta/avg" in stats
    # no clipping statistics: the ESS objective has no clip
    assert UPDATE + "clip_ratio/avg" not in stats


# --- micro-batches and ranks ----------------------------------------------------------------


def test_ess_and_gradients_do_not_depend_on_the_layout(layouts: dict) -> None:
    """One sequence per micro-batch (no two share a packed row): 8 micro-batches on 1 rank vs
    4 + 4 on 2 gloo ranks. The step's ESS is the same number, the naive ESS of all 8 sequences,
    and so are the gradients."""
    (one,) = layouts[1]
    ess = float(one["steps"][0]["ess"])
    assert ess == pytest.approx(float(one["ess_naive"]), rel=1e-6)
    assert [len(s["calls"]) for s in one["steps"]] == [8]
    for rank in layouts[2]:
        assert [len(s["calls"]) for s in rank["steps"]] == [4]
        assert float(rank["steps"][0]["ess"]) == pytest.approx(ess, rel=1e-6)  # sum order
        assert float(rank["ess_naive"]) == pytest.approx(float(one["ess_naive"]), rel=1e-12)
        assert rel(rank["grad"], one["grad"]) <= 1e-6
        assert rank["stats"][UPDATE + "ess"] == pytest.approx(ess, rel=1e-6)


def test_free_path_is_exact_when_the_packing_does_not_change_log_probs(layouts: dict) -> None:
    """With one sequence per micro-batch, AReaL's recomputed ``prox_logp`` is the training
    forward's log-prob, so the free path's ESS is the ESS of what the loss calls received."""
    for ranks in layouts.values():
        for rank in ranks:
            (step,) = rank["steps"]
            assert step["free"] is True
            assert float(step["ess"]) == pytest.approx(float(rank["ess_naive_calls"]), rel=1e-6)


def test_a_rank_without_valid_tokens(out: Path) -> None:
    """Rank 1's sequences have no valid token: AReaL skips its loss calls, the step's ESS (one
    all-reduce at the start of train_batch, outside the skipped calls) is rank 0's tokens'."""
    ranks = _run(out, "empty", "layout", 2, "--empty-rank")
    ess = [float(r["steps"][0]["ess"]) for r in ranks]
    assert ess[0] == ess[1] == pytest.approx(float(ranks[0]["ess_naive"]), rel=1e-6)
    assert len(ranks[0]["steps"][0]["calls"]) == 4
    assert ranks[1]["steps"][0]["calls"] == []
    assert all(torch.isfinite(g).all() for g in ranks[1]["grad"].values())


def test_areal_stats_export_fails_with_a_rank_without_valid_tokens(out: Path) -> None:
    """A limit of AReaL 1.0.4 itself, with its own GRPO loss: the rank whose loss calls were all
    skipped records fewer stats keys, and the all-reduced ``export_all`` mismatches."""
    with pytest.raises(RanksFailed, match=r"collective mismatch|Connection reset"):
        _run(out, "empty_host", "layout", 2, "--empty-rank", "--host-loss", "--areal-export")


# --- several optimizer steps, the trainer's engine factory ----------------------------------


@pytest.fixture(scope="module")
def steps(out: Path) -> dict[str, Any]:
    return _run(out, "steps", "steps", 1)[0]


def test_trainer_builds_the_ess_actor_engine(steps: dict[str, Any]) -> None:
    """``ESSPPOTrainer._create_train_engine`` (SPMD mode) builds the FSDP engine with the ESS
    actor, which then trains."""
    assert (steps["engine_type"], steps["actor_type"]) == ("ESSFSDPPPOActor", "ESSPPOActor")
    assert [s["loss"] for s in steps["steps"]] == ["ESSLoss", "ESSLoss"]


def test_second_step_statistics_come_from_a_forward(steps: dict[str, Any]) -> None:
    """``ppo_n_minibatches=2``, lr 1e-2: the first optimizer step takes the free path, the
    second (after the parameters changed) a no-grad forward, whose ESS is exactly that of the
    log-probs the step's loss calls received."""
    first, second = steps["steps"]
    assert (first["free"], second["free"]) == (True, False)
    assert float(second["ess"]) == pytest.approx(float(steps["ess_naive"][1]), rel=1e-6)
    assert steps["stats"][UPDATE + "ess_step_free"] == 0.5


def test_free_path_with_packed_sdpa_micro_batches_is_close_not_exact(steps: dict[str, Any]) -> None:
    """The first step's micro-batches pack two sequences each, ``compute_logp`` packed four:
    with ``attn_impl="sdpa"`` AReaL's packed row lets sequences attend to each other, so the
    recomputed ``prox_logp`` differs from the training forward's and so does the free path's
    ESS (measured 0.7895 vs 0.7776). ``ess_free_path=False`` makes it exact."""
    first = steps["steps"][0]
    difference = abs(float(first["ess"]) - float(steps["ess_naive"][0]))
    assert 0 < difference < 0.05


# --- bfloat16 -----------------------------------------------------------------------------


def test_bf16_engine_beside_fp32_behaviour_log_probs(out: Path) -> None:
    """The engine in bfloat16 (FSDP2 mixed precision: bf16 logits) with float32 behaviour
    log-probs; AReaL hands the loss float32 log-probs gathered from the bf16 logits. The ESS
    (from a bf16 forward, free path off) is that of the log-probs the calls received, and the
    gradient equals the float64 reference's."""
    (rec,) = _run(out, "bf16", "bf16", 1)
    assert rec["logits_dtypes"] == ["torch.bfloat16"]
    (step,) = rec["steps"]
    assert {c["dtype"] for c in step["calls"]} == {"torch.float32"}
    assert step["free"] is False
    assert float(step["ess"]) == pytest.approx(float(rec["ess_naive_seen"]), rel=1e-6)
    # bfloat16 backward: relative rounding 2^-8 per operation (measured 1.2e-3; the difference
    # from AReaL's GRPO gradient in float32 is 0.42)
    assert rel(rec["grad"], rec["grad_ref"]) <= 1e-2
    assert all(torch.isfinite(g).all() for g in rec["grad"].values())
