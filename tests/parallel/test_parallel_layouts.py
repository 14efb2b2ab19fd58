"""One ESS per step for every parallel layout, with megatron-core's real ``parallel_state``.

Four CPU processes on gloo (``parallel_worker.py``, next to this file) run, one after the other, the layouts
of ``parallel_worker.LAYOUTS`` through verl's ``compute_policy_loss_ess``, whose group comes from
``ess_po.integrations.parallel.ess_process_group``. Each layout's test asserts that every rank
computing the loss reports the same ESS, equal to the ESS of all the step's tokens by the naive
float64 formula in this process, and that ranks computing no loss were not needed. The workers also run the rule before issue 18 (``get_data_parallel_group()``, set
through the public override ``set_process_group``); where that rule is wrong (context
parallelism with per-rank sequence chunks) the test asserts that its ESS breaks the same
property, so the test fails with that rule.

Mutations checked by hand (each made the named test fail, then reverted):
* ``megatron_loss_group`` returning ``get_data_parallel_group()`` (no CP): ``test_cp_chunks``.
* ``megatron_loss_group`` returning ``None`` (world group): ``test_pp_last_stage_only`` fails
  (the two loss ranks wait for the first stage: store timeout), and ``test_tp_replicas``,
  ``test_cp_*`` still pass (uniform replication, see ``test_replication_invariance``).

The multi-process run is marked slow: the layouts take < 0.3 s each, but each of the 4
processes first imports torch, megatron-core and verl (66-113 s of wall time over 7 runs on a
loaded 2-core machine; 2-3 min per run in all). It needs
``pip install --no-deps megatron-core==0.16.1`` and is skipped without it, unless
``ESS_PO_REQUIRE_MEGATRON=1`` (set by ``.ci/run``) turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import parallel_worker as pw
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ess_po import ESSStats, effective_sample_size, ess_policy_loss, ess_stats
from ess_po.testing.processes import child_env, run_ranks

RUN_TIMEOUT_S = 300


def _megatron_available() -> bool:
    try:
        import importlib.metadata as md

        return md.version("megatron-core").startswith("0.16.")
    except Exception:
        return False


def _launch(out: Path) -> dict[int, dict[str, Any]]:
    """Run the 4 workers (torchrun, gloo, loopback) and read the ``rank<r>.json`` each writes."""
    worker = Path(__file__).with_name("parallel_worker.py")
    run_ranks(
        worker, pw.WORLD, [out], env=child_env(PYTHONWARNINGS="ignore"), timeout=RUN_TIMEOUT_S
    )
    runs = {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(pw.WORLD)}
    print("worker seconds (rank 0):", {k: round(v, 2) for k, v in runs[0]["seconds"].items()})
    for layout in pw.LAYOUTS:
        print(
            layout,
            {r: (res[layout].get("ess"), res[layout].get("ess_legacy")) for r, res in runs.items()},
        )
    return runs


@pytest.fixture(scope="module")
def runs() -> Iterator[dict[int, dict[str, Any]]]:
    if not _megatron_available():
        if os.environ.get("ESS_PO_REQUIRE_MEGATRON"):
            pytest.fail("ESS_PO_REQUIRE_MEGATRON is set but megatron-core 0.16 is not installed")
        pytest.skip(
            "megatron-core 0.16 not installed: pip install -c constraints.txt -e '.[test]' "
            "(Linux, CPython 3.10-3.12)"
        )
    pytest.importorskip("verl")
    with tempfile.TemporaryDirectory(prefix="ess-po-parallel-") as out:
        yield _launch(Path(out))


def _reference_ess() -> float:
    """One ESS over all the step's tokens, by the naive float64 formula (Σw)² / (n Σw²)."""
    b = pw.global_batch()
    w = (b["log_prob"] - b["old_log_prob"])[b["response_mask"]].exp()
    return (w.sum() ** 2 / (w.numel() * (w**2).sum())).item()


def test_reference_is_the_core_ess() -> None:
    """The naive reference agrees with the core's single-process ESS on the test's batch."""
    b = pw.global_batch()
    out = ess_policy_loss(
        b["log_prob"], b["old_log_prob"], b["advantages"], b["response_mask"], sync_ess=False
    )
    assert out.ess.item() == pytest.approx(_reference_ess(), rel=1e-6)


def _loss_ranks(runs: dict[int, dict[str, Any]], layout: str) -> dict[int, dict[str, Any]]:
    return {r: res[layout] for r, res in runs.items() if res[layout]["loss_rank"]}


def _assert_one_ess(recs: dict[int, dict[str, Any]], key: str = "ess") -> None:
    ref = _reference_ess()
    got = {r: rec[key] for r, rec in recs.items()}
    # float32 diagnostics: the all-reduced statistics may round differently from one process's
    assert all(v == pytest.approx(ref, rel=1e-6) for v in got.values()), (ref, got)


@pytest.mark.slow
def test_pp_last_stage_only(runs: dict[int, dict[str, Any]]) -> None:
    """PP = 2 x DP = 2: only the last stage computes the loss; its DP ranks agree, no hang.

    With the world group the two last-stage ranks wait in an all-reduce the first stage never
    enters; the run then fails on the store timeout (mutation above).
    """
    recs = _loss_ranks(runs, "pp2_dp2")
    assert sorted(recs) == [2, 3]  # order tp-cp-ep-dp-pp: ranks 2, 3 are the last stage
    assert all(rec["group"] == [2, 3] for rec in recs.values())
    _assert_one_ess(recs)
    _assert_one_ess(recs, "ess_legacy")  # without CP the old rule was right here


@pytest.mark.slow
def test_cp_chunks(runs: dict[int, dict[str, Any]]) -> None:
    """CP = 2 x DP = 2, each CP rank holding its Megatron chunks of each sequence.

    Fails with the rule before issue 18 (``get_data_parallel_group()`` without CP): each CP
    rank then weights its half of the sequences with the ESS of that half only (asserted below).
    """
    recs = _loss_ranks(runs, "cp2_dp2")
    assert len(recs) == 4
    assert all(rec["group"] == [0, 1, 2, 3] for rec in recs.values())
    # each CP rank holds a part of its DP rank's tokens, and the CP ranks hold all of them
    mask = pw.global_batch()["response_mask"]
    for dp in (0, 1):
        parts = [rec["tokens"] for rec in recs.values() if rec["dp_rank"] == dp]
        assert (
            len(parts) == 2
            and min(parts) > 0
            and sum(parts) == int(mask[4 * dp : 4 * dp + 4].sum())
        )
    _assert_one_ess(recs)
    ref = _reference_ess()
    legacy = {rec["cp_rank"]: rec["ess_legacy"] for rec in recs.values()}
    assert legacy[0] != pytest.approx(legacy[1], rel=1e-3)
    assert all(v != pytest.approx(ref, rel=1e-3) for v in legacy.values())


@pytest.mark.slow
def test_cp_gathered_like_verl(runs: dict[int, dict[str, Any]]) -> None:
    """CP = 2 x DP = 2 with the chunks all-gathered before the loss (verl 0.9's Megatron engine).

    The CP ranks then hold copies: the DP x CP group counts each token twice, which leaves ESS
    unchanged, and the old DP-only group is also right.
    """
    recs = _loss_ranks(runs, "cp2_dp2_gathered")
    assert len(recs) == 4
    _assert_one_ess(recs)
    _assert_one_ess(recs, "ess_legacy")


@pytest.mark.slow
def test_tp_replicas(runs: dict[int, dict[str, Any]]) -> None:
    """TP = 2 x DP = 2 with replicated log-probs: the group is DP (TP copies need not join)."""
    recs = _loss_ranks(runs, "tp2_dp2")
    assert len(recs) == 4
    assert sorted(tuple(rec["group"]) for rec in recs.values()) == [(0, 2), (0, 2), (1, 3), (1, 3)]
    _assert_one_ess(recs)


@pytest.mark.slow
def test_tp_pp_single_dp(runs: dict[int, dict[str, Any]]) -> None:
    """TP = 2 x PP = 2 (DP = 1): each last-stage TP rank holds the whole step; no collective."""
    recs = _loss_ranks(runs, "tp2_pp2")
    assert sorted(recs) == [2, 3]
    assert all(len(rec["group"]) == 1 for rec in recs.values())
    _assert_one_ess(recs)


@pytest.mark.slow
def test_expert_parallel(runs: dict[int, dict[str, Any]]) -> None:
    """EP = 2 x DP = 4: experts are sharded, tokens are not; all 4 DP ranks join."""
    recs = _loss_ranks(runs, "ep2_dp4")
    assert len(recs) == 4
    assert all(rec["group"] == [0, 1, 2, 3] for rec in recs.values())
    _assert_one_ess(recs)


@pytest.mark.slow
def test_ulysses(runs: dict[int, dict[str, Any]]) -> None:
    """verl's FSDP + Ulysses mesh (dp=2, sp=2) on CPU: slices all-gathered, world group."""
    recs = _loss_ranks(runs, "ulysses_sp2_dp2")
    assert len(recs) == 4
    assert all(rec["group"] == [0, 1, 2, 3] for rec in recs.values())
    assert all(rec["slice_tokens"] < rec["tokens"] for rec in recs.values())  # SP did slice
    _assert_one_ess(recs)


_lw = st.lists(st.floats(-30, 30, allow_nan=False), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(lw=_lw, k=st.integers(1, 4))
def test_replication_invariance(lw: list[float], k: int) -> None:
    """ESS of every token copied k times = ESS of the tokens: (k S1)² / (k n · k S2) = S1² / (n S2).

    This is why replicas (TP, Ulysses, gathered CP) may join the reduction group.
    """
    x = torch.tensor(lw, dtype=torch.float64)
    once = ess_stats(x)
    merged = once
    for _ in range(k - 1):
        merged = merged.merge(once)
    assert merged.ess().item() == pytest.approx(once.ess().item(), rel=1e-12)
    copied = effective_sample_size(x.repeat(k), sync=False)
    assert copied.item() == pytest.approx(once.ess().item(), rel=1e-12)


def test_non_uniform_replication_changes_ess() -> None:
    """Replication must be uniform: copying one token more often than another changes ESS."""
    x = torch.tensor([0.0, 2.0], dtype=torch.float64)
    twice_first = torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64)
    assert effective_sample_size(twice_first).item() != pytest.approx(
        effective_sample_size(x).item(), rel=1e-3
    )
    assert isinstance(ess_stats(x), ESSStats)
