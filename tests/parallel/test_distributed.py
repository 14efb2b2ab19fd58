"""ESS over data-parallel ranks: 2 and 3 CPU processes on the gloo backend.

Run as a script, this file is one rank (``run_ranks`` starts it): ``CASE OUT_DIR``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ess_po.testing.batches import make_batch
from ess_po.testing.processes import run_ranks

# Rows of the 6-sequence batch each rank holds; an empty slice is a rank with no data (B = 0).
SHARDS = {
    "2-ranks": [slice(0, 2), slice(2, 6)],
    "2-ranks-rank1-masked": [slice(0, 2), slice(2, 6)],
    "2-ranks-rank0-empty": [slice(0, 0), slice(0, 6)],
    "3-ranks-rank1-empty": [slice(0, 3), slice(3, 3), slice(3, 6)],
}


def _whole_batch(case: str):
    b = make_batch(6, 9, seed=21, staleness=0.7, empty_rows=1)
    if case == "2-ranks-rank1-masked":
        b.mask[2:] = False
    return b


def _shard(rank: int, case: str):
    b = _whole_batch(case)
    rows = SHARDS[case][rank]
    lp = b.logp_new.detach()[rows].clone().requires_grad_(True)
    return lp, b.logp_old[rows], b.advantages[rows], b.mask[rows]


def _worker(case: str, out_dir: Path) -> None:
    """One rank: its shard's loss, gradient and ESS (per call and step), to ``rank{r}.pt``."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        from ess_po import effective_sample_size, ess_policy_loss, ess_stats, step_stats

        lp, lo, adv, mask = _shard(rank, case)
        n_global = mask.sum().double()
        dist.all_reduce(n_global)
        res = ess_policy_loss(lp, lo, adv, mask, normalizer=n_global)
        res.loss.backward()
        unsynced = ess_policy_loss(lp.detach(), lo, adv, mask, sync_ess=False)
        # Step scope: this rank's micro-batches (two halves) merged, then all-reduced once.
        halves = [(lp.detach()[r] - lo[r], mask[r]) for r in (slice(0, 1), slice(1, None))]
        stats = step_stats(halves)
        assert isinstance(stats, type(ess_stats(lo, mask)))
        lp2 = lp.detach().clone().requires_grad_(True)
        step_loss = 0.0
        for r in (slice(0, 1), slice(1, None)):
            part = ess_policy_loss(lp2[r], lo[r], adv[r], mask[r], normalizer=n_global, stats=stats)
            step_loss = step_loss + part.loss
        if isinstance(step_loss, torch.Tensor):
            step_loss.backward()
        result = dict(
            ess=res.ess.item(),
            ess_fn=effective_sample_size(lp.detach() - lo, mask).item(),
            ess_local=unsynced.ess.item(),
            ess_step=stats.ess().item(),
            loss=res.loss.item(),
            grad=lp.grad.clone(),
            step_grad=torch.zeros_like(lp) if lp2.grad is None else lp2.grad.clone(),
        )
        torch.save(result, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run(case: str, tmp_path: Path) -> dict[int, dict]:
    world = len(SHARDS[case])
    run_ranks(Path(__file__), world, [case, tmp_path], timeout=300)
    return {r: torch.load(tmp_path / f"rank{r}.pt") for r in range(world)}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SHARDS))
def test_ess_and_gradient_over_gloo_ranks(case: str, tmp_path: Path) -> None:
    """Every rank, empty ones included, joins the all-reduce and sees the ESS of the whole
    batch; with the global count as normaliser the shard gradients add up to the whole batch's.
    Step statistics (merged micro-batches, one all-reduce) give the same ESS and gradient.
    Mutation check: replacing the body of ``all_reduce_stats`` by ``return stats`` fails the
    ``ess`` and ``ess_step`` assertions (and the gradient ones)."""
    from ess_po import effective_sample_size, ess_policy_loss

    results = _run(case, tmp_path)
    world = len(SHARDS[case])
    b = _whole_batch(case)
    whole = ess_policy_loss(b.logp_new, b.logp_old, b.advantages, b.mask)
    whole.loss.backward()
    ess64 = effective_sample_size(b.logp_new.detach() - b.logp_old, b.mask).item()
    for rank in range(world):
        # every rank sees the ESS of the concatenated batch, not of its shard
        assert results[rank]["ess_fn"] == pytest.approx(ess64, rel=1e-12)
        assert results[rank]["ess_step"] == pytest.approx(ess64, rel=1e-12)
        assert results[rank]["ess"] == pytest.approx(ess64, rel=1e-7)  # float32 diagnostic
    if case == "2-ranks":  # the shard's own ESS differs: the all-reduce mattered
        assert results[0]["ess_local"] != pytest.approx(ess64, rel=1e-6)
    # with the global token count as normaliser the shard losses and gradients add up to the
    # whole batch's (DDP then averages; frameworks scale by world size as verl does)
    total = sum(results[r]["loss"] for r in range(world))
    assert total == pytest.approx(whole.loss.item(), rel=1e-10)
    grad = torch.cat([results[r]["grad"] for r in range(world)])
    torch.testing.assert_close(grad, b.logp_new.grad)
    step_grad = torch.cat([results[r]["step_grad"] for r in range(world)])
    torch.testing.assert_close(step_grad, b.logp_new.grad)


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
