"""Step scope over data-parallel ranks in verl's real actor (issue 15).

``tests/verl/verl_actor_worker.py OUT ranks`` runs verl 0.9.1's FSDP2 actor (the chain of
``test_verl_actor.py``, CPU workarounds in ``ess_po.testing.verl_harness``) as 1 and as 2
gloo processes under ``torchrun`` (loopback, scrubbed environment, timeout). Each rank calls
verl's trainer methods (``RayPPOTrainer._compute_old_log_prob`` / ``_update_actor``); a
``RankView`` stands in for Ray's worker group and gives rank ``r`` chunk ``r`` of verl's own
dispatch split (``_split_args_kwargs_data_proto``). Gradients are reduce-scattered by FSDP2 over
gloo. The batch rows are ordered so that optimizer step ``s`` trains the same 8 sequences on
either world size (4 per rank when there are 2). Policy frozen (lr 0), known log-ratio offsets,
fp32 compute; ``ess_step`` and ``ess`` with 1 and 4 sequences per micro-batch per rank.

``test_free_path_on_ranks``: verl's recomputed ``old_log_prob`` used as is; every rank takes
the free path on the first optimizer step (the ranks agree through a MIN all-reduce).

Mutations checked (each fails ``test_step_scope_is_invariant_to_ranks_and_split``):

* all-reduce removed: ``StepScope.rank_stats`` calling ``step_stats(..., sync=False)`` (each rank
  keeps the statistics of its own 4 sequences): on 2 ranks rank 0 reports ESS 0.8288 / 0.8026
  and rank 1 0.7277 / 0.9047 instead of the steps' 0.7304 / 0.7989, and the step gradients move
  by 6.9% / 4.0% (relative max-abs) for either micro-batch size;
* pre-pass bypassed: the ``ess_step`` loss passing ``stats=None`` (``ess_scope="call"``) (each call's own
  ESS, all-reduced per call, instead of the pre-pass statistics): 1 rank with micro-batches of
  1 reports 0.9561 for the first call, and every gradient element differs.
"""

from __future__ import annotations

from typing import Any

import pytest
from torch.testing import assert_close

pytest.importorskip("verl.trainer.ppo.core_algos")
pytest.importorskip("ess_po.integrations.verl")
for _module in ("uvicorn", "fastapi", "torchdata", "cachetools", "hydra"):
    pytest.importorskip(_module)

from test_verl_step import _ess, _relative_difference  # noqa: E402
from verl_actor_worker import run_actor_ranks  # noqa: E402

WORLDS, MICROS = (1, 2), (1, 4)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    out = {}
    for world in WORLDS:
        out[world] = run_actor_ranks(tmp_path_factory.mktemp(f"world{world}"), world, timeout=600)
    return out


def _old_log_probs(ranks: dict) -> Any:
    """old_log_probs of the 1-process run (verl recomputes them in every run)."""
    return ranks[1][0]["runs"]["ess_step_micro1"]["old_log_probs"]


def _step_ess(record: dict) -> list[float]:
    """ESS of each optimizer step's 8 sequences, in float64 from the known offsets."""
    offsets, mask = record["offsets"], record["response_mask"]
    return [_ess(offsets[:8], mask[:8]), _ess(offsets[8:], mask[8:])]


@pytest.mark.slow
def test_step_scope_is_invariant_to_ranks_and_split(ranks: dict) -> None:
    """With ``ess_step`` every loss call on every rank reports the ESS of its optimizer step's 8
    sequences, and the full gradient of each optimizer step (after FSDP2's reduce-scatter) is
    the same for 1 or 2 ranks and 1 or 4 sequences per micro-batch (float32 tolerance). Each
    rank's own 4 sequences have a different ESS, so a rank that used only its share would be
    caught."""
    reference = ranks[1][0]["runs"]["ess_step_micro4"]["grads"]
    expected = _step_ess(ranks[1][0])
    record = ranks[2][0]
    offsets, mask = record["offsets"], record["response_mask"]
    for step, rows in enumerate((slice(0, 4), slice(4, 8))):  # rank 0's share of each step
        shifted = slice(rows.start + 8 * step, rows.stop + 8 * step)
        assert abs(_ess(offsets[shifted], mask[shifted]) - expected[step]) > 1e-2
    for world in WORLDS:
        for rank, record in enumerate(ranks[world]):
            assert_close(record["runs"]["ess_step_micro1"]["old_log_probs"], _old_log_probs(ranks))
            for micro in MICROS:
                run = record["runs"][f"ess_step_micro{micro}"]
                per_step = 8 // world // micro
                assert len(run["calls"]) == 2 * per_step, (world, rank, micro)
                for i, call in enumerate(run["calls"]):
                    assert call["log_prob_dtype"] == "torch.float32"
                    assert call["global_batch_info"]["dp_size"] == world
                    assert call["metrics"]["actor/ess"] == pytest.approx(
                        expected[i // per_step], abs=1e-5
                    ), (world, rank, micro, i)
                for step in range(2):
                    for name, grad in run["grads"][step].items():
                        assert_close(grad, reference[step][name], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_per_call_scope_depends_on_ranks(ranks: dict) -> None:
    """Contrast: with ``ess`` (one ESS per call, all-reduced over the ranks of that call) the
    same micro-batch size per rank covers twice the sequences on 2 ranks, so ESS and gradients
    differ between 1 and 2 ranks (gradients over 1% relative). With 4 per rank on 2 ranks each
    call covers the whole step, so those equal ``ess_step``'s."""
    expected = _step_ess(ranks[1][0])
    for micro in MICROS:
        one = ranks[1][0]["runs"][f"ess_micro{micro}"]
        two = ranks[2][0]["runs"][f"ess_micro{micro}"]
        per_step = 8 // micro
        deviation = max(
            abs(c["metrics"]["actor/ess"] - expected[i // per_step])
            for i, c in enumerate(one["calls"])
        )
        assert deviation > 5e-2, micro  # 1 rank: calls of 1 or 4 sequences, not the step's ESS
        for step in range(2):
            assert _relative_difference(two["grads"][step], one["grads"][step]) > 1e-2
    whole = ranks[2][0]["runs"]["ess_micro4"]
    assert [c["metrics"]["actor/ess"] for c in whole["calls"]] == pytest.approx(expected, abs=1e-5)
    step = ranks[1][0]["runs"]["ess_step_micro4"]["grads"]
    for s in range(2):
        for name, grad in whole["grads"][s].items():
            assert_close(grad, step[s][name], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_free_path_on_ranks(ranks: dict) -> None:
    """Free path on 1 and 2 ranks: verl's recomputed old_log_prob used as is (lr 0, micro-batches
    of 1 per rank). On every rank the first optimizer step runs no pre-pass forward and logs
    ``actor/ess_step_free`` 1 and ESS 1; the second (after an optimizer step, so the record no
    longer holds) runs one, with ESS 1 up to float32 rounding (the policy did not move); the
    step gradients are the same on 1 and 2 ranks (float32 tolerance)."""
    reference = ranks[1][0]["runs"]["ess_step_onpolicy_micro1"]["grads"]
    for world in WORLDS:
        for rank, record in enumerate(ranks[world]):
            run = record["runs"]["ess_step_onpolicy_micro1"]
            per_step = 8 // world
            assert run["prepass_forwards"] == 1, (world, rank)
            flags = [c["metrics"]["actor/ess_step_free"] for c in run["calls"]]
            assert flags == [1.0] * per_step + [0.0] * per_step, (world, rank)
            ess = [c["metrics"]["actor/ess"] for c in run["calls"]]
            assert ess[:per_step] == [1.0] * per_step
            assert ess[per_step:] == pytest.approx([1.0] * per_step, abs=1e-6)
            for step in range(2):
                for name, grad in run["grads"][step].items():
                    assert_close(grad, reference[step][name], rtol=1e-5, atol=1e-7)
