"""One rank of the parallel-layout run (``test_parallel_layouts.py`` starts four with
``ess_po.testing.processes.run_ranks``).

Each rank joins a gloo world of 4 CPU processes (torchrun's ``env://`` rendezvous), connects to
the rendezvous store of torchrun's agent, and for every layout

* initialises megatron-core's real ``parallel_state`` (or, for Ulysses, torch's device mesh as
  verl's FSDP engine builds it),
* gives each rank the tokens the layout gives it: whole rows per DP rank, Megatron's own
  ``get_batch_on_this_cp_rank`` chunks per CP rank, copies per TP rank, nothing on pipeline
  stages that compute no loss, verl's Ulysses slice + all-gather per SP rank,
* calls verl's ``compute_policy_loss_ess`` (the shim picks its group with
  ``ess_po.integrations.parallel.ess_process_group``) on the ranks that compute the loss, and
  again with the legacy rule ``set_process_group(get_data_parallel_group())`` (without CP),

then writes ``rank<r>.json``. Ranks synchronise between layouts through the store, never by a
collective: a loss rank stuck in an all-reduce that a non-loss rank never enters (the world
group under pipeline parallelism) then fails with a timeout instead of pairing with an
unrelated collective.

Usage: ``torchrun --standalone --nproc-per-node 4 tests/parallel/parallel_worker.py OUT_DIR``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from typing import Any

import torch

WORLD = 4
B, T = 8, 16  # T divisible by 2 * CP for Megatron's load-balanced CP split
STORE_TIMEOUT_S = 120.0
COLLECTIVE_TIMEOUT_S = 60.0

#: name -> Megatron sizes (world 4). "gathered" CP all-gathers the chunks before the loss, as
#: verl 0.9's Megatron engine does (verl/models/mcore/util.py, postprocess_packed_seqs).
MEGATRON_LAYOUTS: dict[str, dict[str, Any]] = {
    "pp2_dp2": {"pp": 2},
    "cp2_dp2": {"cp": 2},
    "cp2_dp2_gathered": {"cp": 2, "gather_cp": True},
    "tp2_dp2": {"tp": 2},
    "tp2_pp2": {"tp": 2, "pp": 2},
    "ep2_dp4": {"ep": 2},
}
LAYOUTS = (*MEGATRON_LAYOUTS, "ulysses_sp2_dp2")


def global_batch(seed: int = 18) -> dict[str, torch.Tensor]:
    """The step's tokens, ``(B, T)`` float64: random lengths, one empty row, stale old log-probs.

    The log-ratio spread grows along the sequence, so the halves of each sequence that
    Megatron's CP split gives the two CP ranks have clearly different ESS.
    """
    g = torch.Generator().manual_seed(seed)
    logp = -3.0 * torch.rand(B, T, generator=g, dtype=torch.float64)
    spread = torch.linspace(0.1, 1.5, T, dtype=torch.float64)
    old = logp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    lengths[3] = 0  # a padding-only row
    mask = torch.arange(T) < lengths.unsqueeze(1)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).contiguous()
    return {"log_prob": logp, "old_log_prob": old, "advantages": adv, "response_mask": mask}


def _rows(batch: dict[str, torch.Tensor], index: int, parts: int) -> dict[str, torch.Tensor]:
    size = B // parts
    return {k: v[index * size : (index + 1) * size].clone() for k, v in batch.items()}


def _ess(batch: dict[str, torch.Tensor]) -> float:
    from ess_po.integrations.verl import compute_policy_loss_ess

    _, metrics = compute_policy_loss_ess(
        batch["old_log_prob"],
        batch["log_prob"].requires_grad_(True),
        batch["advantages"],
        batch["response_mask"],
    )
    return metrics["actor/ess"].item()


def _ranks(group: Any) -> list[int]:
    import torch.distributed as dist

    return dist.get_process_group_ranks(group or dist.group.WORLD)


def _gather_cp_chunks(local: dict[str, torch.Tensor], mpu: Any) -> dict[str, torch.Tensor]:
    """Undo Megatron's CP split with an all-gather over the CP group, as verl does."""
    import torch.distributed as dist

    cp = mpu.get_context_parallel_world_size()
    out = {}
    for key, val in local.items():
        parts = [torch.empty_like(val) for _ in range(cp)]
        dist.all_gather(parts, val.contiguous(), group=mpu.get_context_parallel_group())
        chunks = [None] * (2 * cp)
        for r, part in enumerate(parts):  # rank r holds chunks r and 2cp-1-r
            first, second = part.chunk(2, dim=1)
            chunks[r], chunks[2 * cp - 1 - r] = first, second
        out[key] = torch.cat(chunks, dim=1)
    return out


def run_megatron(name: str, rank: int) -> dict[str, Any]:
    from megatron.core import parallel_state as mpu
    from megatron.core.utils import get_batch_on_this_cp_rank

    from ess_po.integrations import verl as shim
    from ess_po.integrations.parallel import ess_process_group

    sizes = MEGATRON_LAYOUTS[name]
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=sizes.get("tp", 1),
        pipeline_model_parallel_size=sizes.get("pp", 1),
        context_parallel_size=sizes.get("cp", 1),
        expert_model_parallel_size=sizes.get("ep", 1),
        create_gloo_process_groups=False,  # the default backend is gloo already
    )
    try:
        rec: dict[str, Any] = {
            "loss_rank": mpu.is_pipeline_last_stage(),
            "dp_rank": mpu.get_data_parallel_rank(),
            "cp_rank": mpu.get_context_parallel_rank(),
            "tp_rank": mpu.get_tensor_model_parallel_rank(),
            "pp_rank": mpu.get_pipeline_model_parallel_rank(),
        }
        if not rec["loss_rank"]:
            return rec  # earlier pipeline stages never call the policy loss
        local = _rows(
            global_batch(), mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
        )
        local = get_batch_on_this_cp_rank(local)  # Megatron's load-balanced 2*CP-chunk split
        if sizes.get("gather_cp"):
            local = _gather_cp_chunks(local, mpu)
        rec["tokens"] = int(local["response_mask"].sum())
        rec["group"] = _ranks(ess_process_group())
        rec["ess"] = _ess({k: v.clone() for k, v in local.items()})
        legacy = mpu.get_data_parallel_group()  # the rule before issue 18 (no CP ranks)
        rec["legacy_group"] = _ranks(legacy)
        shim.set_process_group(legacy)  # also exercises the public override
        try:
            rec["ess_legacy"] = _ess({k: v.clone() for k, v in local.items()})
        finally:
            shim.set_process_group(None)
        return rec
    finally:
        mpu.destroy_model_parallel()


def run_ulysses(rank: int) -> dict[str, Any]:
    """verl's FSDP + Ulysses layout: mesh (dp=2, sp=2), packed tokens sliced then all-gathered."""
    from torch.distributed.device_mesh import init_device_mesh
    from verl.utils.ulysses import (
        gather_outputs_and_unpad,
        set_ulysses_sequence_parallel_group,
        ulysses_pad_and_slice_inputs,
    )

    from ess_po.integrations.parallel import ess_process_group

    sp = 2
    # as verl's FSDPEngine._init_device_mesh builds it, with "cpu" for the device name
    mesh = init_device_mesh("cpu", mesh_shape=(WORLD // sp, sp), mesh_dim_names=["dp", "sp"])
    set_ulysses_sequence_parallel_group(mesh["sp"].get_group())
    try:
        local = _rows(global_batch(), mesh["dp"].get_local_rank(), WORLD // sp)
        mask = local["response_mask"]
        gathered = {"response_mask": mask}
        for key in ("log_prob", "old_log_prob", "advantages"):
            packed = local[key][mask].unsqueeze(0)  # remove-padding layout: (1, nnz)
            piece, _, pad = ulysses_pad_and_slice_inputs(packed, sp_size=sp)
            full = gather_outputs_and_unpad(
                piece.squeeze(0), gather_dim=0, unpad_dim=0, padding_size=pad
            )
            dense = torch.zeros_like(local[key])
            dense[mask] = full
            gathered[key] = dense
        return {
            "loss_rank": True,
            "sp_rank": mesh["sp"].get_local_rank(),
            "slice_tokens": int(piece.numel()),
            "tokens": int(mask.sum()),
            "group": _ranks(ess_process_group()),
            "ess": _ess(gathered),
        }
    finally:
        set_ulysses_sequence_parallel_group(None)


def main() -> None:
    out_dir = sys.argv[1]
    start = time.perf_counter()
    torch.set_num_threads(1)
    # Import the frameworks before the rendezvous so that no rank waits on another's imports.
    import megatron.core.parallel_state  # noqa: F401
    import torch.distributed as dist

    import ess_po.integrations.verl  # noqa: F401  (imports verl)

    dist.init_process_group("gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == WORLD, world
    # torchrun's agent hosts the rendezvous store (it outlives every rank); our keys get a prefix
    store = dist.PrefixStore(
        "layouts/",
        dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=STORE_TIMEOUT_S),
        ),
    )
    results: dict[str, Any] = {"seconds": {"imports": time.perf_counter() - start}}
    try:
        for name in LAYOUTS:
            t0 = time.perf_counter()
            results[name] = (
                run_ulysses(rank) if name.startswith("ulysses") else run_megatron(name, rank)
            )
            store.set(f"done/{name}/{rank}", "1")
            store.wait(
                [f"done/{name}/{r}" for r in range(world)], timedelta(seconds=STORE_TIMEOUT_S)
            )
            results["seconds"][name] = time.perf_counter() - t0
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
