"""The ESS objective trained asynchronously by AReaL 1.0.4: AReaL's ``WorkflowExecutor`` and
``StalenessManager`` (``max_head_offpolicyness=4``) feeding its FSDP2 actor engine on CPU, with
a stand-in inference engine sampling from pushed weights (``ess_po.testing.areal_async``).

Opt-in: runs in the environment ``.ci/areal.sh`` builds; skipped where AReaL does not import,
unless ``ESS_PO_REQUIRE_AREAL=1`` (set there) turns the skip into an error. One run for the
module (about 30 s on 2 cores): 8 steps of 4 prompts x 8 completions; every test reads what
it recorded.

What must hold, and why:

* AReaL admits sample ``i`` (in admission order) at a version ``v >= floor(i / B) - K``
  (``accepted + running < (K + v + 1) B``). The stand-in finishes rollouts in admission order,
  so ``wait`` hands them over in that order and sample ``i`` trains at version ``floor(i / B)``:
  staleness never exceeds ``K`` (it is lower when a rollout starts later than its admission
  allowed). The rollout side outpaces the trainer here, so the bound is reached (steps 0..4
  see staleness 0..4, then 4), but only ``>= 1`` is asserted: that part depends on timing.
* At staleness 0 the stand-in and the trainer hold the same float32 weights: ESS is 1 up to
  rounding. On stale steps the policy has moved: ESS < 1. AReaL's tracker must report the ESS
  the loss used (on this path, the behaviour weights against the recomputed proximal log-probs)
  and the staleness measured here from ``versions``.

Nothing is asserted about the reward: 8 noisy steps say nothing about learning.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from ess_po.testing.requirements import require

# the import below needs AReaL: it follows the skip (E402 on purpose)
require("areal", "ESS_PO_REQUIRE_AREAL", "AReaL tests need its environment: run .ci/areal.sh")

from ess_po.testing.areal_async import run_async  # noqa: E402

pytestmark = pytest.mark.slow
K = 4  # max_head_offpolicyness
STEPS = 8
PROMPTS = 4  # consumer batch (trajectories per step)
GROUP = 8


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("areal_async")
    return run_async(out, STEPS, K, "ess", timeout=240, prompts=PROMPTS, group_size=GROUP)


@pytest.fixture(scope="module")
def steps(run: dict[str, Any]) -> list[dict[str, Any]]:
    return run["steps"]


def test_the_run_finishes_every_step(run: dict[str, Any], steps: list[dict[str, Any]]) -> None:
    assert run["loss"] == "ess" and run["offpolicyness"] == K
    assert [s["step"] for s in steps] == list(range(STEPS))
    assert [s["version"] for s in steps] == list(range(STEPS))
    assert all(s["n_seqs"] == PROMPTS * GROUP for s in steps)
    # the rollout side ran ahead: K + 1 batches beyond the last one trained were submitted
    assert run["completions_sampled"] >= STEPS * PROMPTS * GROUP


def test_batches_are_stale_within_the_staleness_bound(steps: list[dict[str, Any]]) -> None:
    for s in steps:
        assert 0 <= s["staleness_min"] <= s["staleness_max"] <= min(s["step"], K), s
        assert s["sequence_staleness_constant"], s  # one version per completion
    assert steps[0]["staleness_max"] == 0  # nothing trained yet
    # really asynchronous. (How stale depends on how far the rollouts run ahead of the trainer:
    # here they reach the bound, 0 1 2 3 4 4 4 4, but a slower sampler would see less.)
    assert max(s["staleness_max"] for s in steps) >= 1, [s["staleness_hist"] for s in steps]


def test_the_tracker_reports_the_measured_staleness(steps: list[dict[str, Any]]) -> None:
    for s in steps:
        assert s["tracker_staleness_max"] == s["staleness_max"], s
        # the tracker counts a completion's tokens from its second one (AReaL's rolled mask)
        assert s["staleness_min"] - 1e-6 <= s["tracker_staleness_avg"] <= s["staleness_max"] + 1e-6
        if s["staleness_min"] == s["staleness_max"]:
            assert s["tracker_staleness_avg"] == pytest.approx(s["staleness_avg"], abs=1e-6)


def test_ess_is_logged_every_step_finite_and_in_unit_interval(
    steps: list[dict[str, Any]],
) -> None:
    for s in steps:
        ess = s["ess"]
        assert ess is not None, f"step {s['step']}: no ppo_actor/update/ess exported"
        assert math.isfinite(ess) and 0.0 < ess <= 1.0 + 1e-6, s
        assert s["stats"]["ppo_actor/update/ess_step_free"] == 1.0  # from the recomputed logps
        for key in ("ess_capped_frac", "ess_kl_behavior", "grad_norm"):
            assert s[key] is not None and math.isfinite(s[key]), (key, s)


def test_ess_is_one_on_policy_and_below_one_when_stale(steps: list[dict[str, Any]]) -> None:
    on_policy = [s for s in steps if s["staleness_max"] == 0]
    stale = [s for s in steps if s["staleness_min"] >= 1]
    assert on_policy and stale
    for s in on_policy:  # same weights, same float32 forward: rounding only
        assert s["ess"] > 1 - 1e-6, s
        assert abs(s["ess_kl_behavior"]) < 1e-5, s
    for s in stale:
        assert s["ess"] < 1 - 1e-4, s
        assert s["ess_kl_behavior"] > 1e-4, s


def test_tracker_ess_is_the_batch_behaviour_ess(steps: list[dict[str, Any]]) -> None:
    # first mini-batch of the update: the loss's current log-probs are the recomputed ones
    for s in steps:
        assert s["ess"] == pytest.approx(s["ess_batch"], abs=2e-5), s
