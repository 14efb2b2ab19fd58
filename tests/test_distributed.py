"""ESS over data-parallel ranks: 2 CPU processes on the gloo backend."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _whole_batch():
    from conftest import make_batch

    return make_batch(6, 9, seed=21, staleness=0.7, empty_rows=1)


def _shard(rank: int, empty_rank: bool):
    b = _whole_batch()
    rows = slice(0, 2) if rank == 0 else slice(2, 6)
    mask = b.mask[rows].clone()
    if empty_rank and rank == 1:
        mask[:] = False
    lp = b.logp_new.detach()[rows].clone().requires_grad_(True)
    return lp, b.logp_old[rows], b.advantages[rows], mask


def _worker(rank: int, port: int, empty_rank: bool, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from ess_po import effective_sample_size, ess_policy_loss

        lp, lo, adv, mask = _shard(rank, empty_rank)
        n_global = torch.tensor(float(mask.sum()))
        dist.all_reduce(n_global)
        res = ess_policy_loss(lp, lo, adv, mask, normalizer=n_global)
        res.loss.backward()
        unsynced = ess_policy_loss(lp.detach(), lo, adv, mask, sync_ess=False)
        out[rank] = dict(
            ess=res.ess.item(),
            ess_fn=effective_sample_size(lp.detach() - lo, mask).item(),
            ess_local=unsynced.ess.item(),
            loss=res.loss.item(),
            grad=lp.grad.clone(),
        )
    finally:
        dist.destroy_process_group()


def _run(empty_rank: bool) -> dict:
    port = _free_port()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(
            _worker, args=(port, empty_rank, out), nprocs=WORLD, join=True, start_method="spawn"
        )
        return dict(out)


@pytest.mark.parametrize("empty_rank", [False, True], ids=["both-ranks", "rank1-empty"])
def test_ess_and_gradient_over_two_gloo_ranks(empty_rank: bool) -> None:
    from ess_po import effective_sample_size, ess_policy_loss

    results = _run(empty_rank)
    b = _whole_batch()
    mask = b.mask.clone()
    if empty_rank:
        mask[2:] = False
    whole = ess_policy_loss(b.logp_new, b.logp_old, b.advantages, mask)
    whole.loss.backward()
    ess64 = effective_sample_size(b.logp_new.detach() - b.logp_old, mask).item()
    for rank in range(WORLD):
        # every rank sees the ESS of the concatenated batch, not of its shard
        assert results[rank]["ess_fn"] == pytest.approx(ess64, rel=1e-12)
        assert results[rank]["ess"] == pytest.approx(ess64, rel=1e-7)  # float32 diagnostic
    if not empty_rank:  # the shard's own ESS differs: the all-reduce mattered
        assert results[0]["ess_local"] != pytest.approx(ess64, rel=1e-6)
    # with the global token count as normaliser the shard losses and gradients add up to the
    # whole batch's (DDP then averages; frameworks scale by world size as verl does)
    assert results[0]["loss"] + results[1]["loss"] == pytest.approx(whole.loss.item(), rel=1e-10)
    grad = torch.cat([results[0]["grad"], results[1]["grad"]])
    torch.testing.assert_close(grad, b.logp_new.grad)
