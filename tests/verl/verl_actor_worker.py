"""verl 0.9.1's own actor update on the CPU, run in a subprocess: scenarios and launchers.

Usage: ``python tests/verl/verl_actor_worker.py OUT_DIR [step|free]`` writes ``OUT_DIR/result.pt``;
``torchrun --nproc_per_node=N tests/verl/verl_actor_worker.py OUT_DIR ranks`` (N = 1 or 2 gloo
processes, see :func:`main_ranks`) writes ``OUT_DIR/rank{r}.pt``. The tests start them with
:func:`run_actor_worker` and :func:`run_actor_ranks`.

The chain exercised is verl's: trainer (``RayPPOTrainer._compute_old_log_prob`` and
``RayPPOTrainer._update_actor``, called on a minimal host object holding the Hydra config and
the worker) -> ``ActorRolloutRefWorker.update_actor`` -> ``TrainingWorker.train_mini_batch`` ->
FSDP2 ``FSDPEngineWithLMHead.train_batch`` (micro-batches, backward, optimizer step) ->
``verl.workers.utils.losses.ppo_loss`` -> ``get_policy_loss_fn(loss_mode)`` -> the registered
loss; metrics come back through ``Metric.aggregate_dp`` and ``reduce_metrics``. The CPU
workarounds and the worker machinery are in :mod:`ess_po.testing.verl_harness`. Two instruments
observe without changing anything: ``LossSpy`` records each policy-loss call's inputs and
metrics, and an optimizer step pre-hook records the gradients of each optimizer step.

Runs (each its own worker, built from ``ppo_trainer.yaml`` with its own overrides; verl's
defaults: AdamW, FSDP mixed precision with bf16 compute and fp32 parameters / reductions):

* ``vanilla`` / ``ess`` / ``ess_seq``: lr 2e-2, 16 sequences = 2 mini-batches of 8, micro-batch 2
  (4 micro-batches per optimizer step). old_log_prob recomputed by verl, so the first step is
  on-policy and the second is not.
* ``ess_fixed``: lr 0 (the policy never moves), old_log_prob = recomputed - known offsets, so the
  log-ratio of every token is known exactly and the ESS of every call can be predicted.
* ``ess_bypass``: lr 0; verl 0.9.1's v1 trainer in rollout-correction bypass mode
  (``PPOTrainer._compute_old_log_prob``) turns the rollout log-probs into old_log_probs; the
  actor update must hand exactly those to the ESS loss.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

from ess_po.testing import verl_harness as vh
from ess_po.testing.processes import child_env, run_ranks
from ess_po.testing.verl_harness import (
    LossSpy,
    build_worker,
    old_log_prob,
    rollout_batch,
    update,
    weights,
    with_known_offsets,
)

REPEATS = 3
SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parents[2]


def run_actor_worker(out_dir: Path, *args: str, timeout: int) -> dict[str, Any]:
    """Run this script ``OUT_DIR *args`` in a fresh interpreter (the scrubbed environment of
    :func:`ess_po.testing.processes.child_env`) and load the ``result.pt`` it writes."""
    import torch

    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out_dir), *args],
        env=child_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(proc.stderr[-4000:])
    return torch.load(out_dir / "result.pt", weights_only=False)


def run_actor_ranks(out_dir: Path, world: int, *, timeout: int) -> list[dict[str, Any]]:
    """Run this script ``OUT_DIR ranks`` as ``world`` gloo ranks
    (:func:`ess_po.testing.processes.run_ranks`) and load the ``rank{r}.pt`` each writes."""
    import torch

    run_ranks(SCRIPT, world, [out_dir, "ranks"], timeout=timeout, cwd=REPO)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def v1_bypass_old_log_prob(host: Any, batch: Any) -> tuple[Any, str]:
    """Run verl 0.9.1's v1 ``PPOTrainer._compute_old_log_prob`` with
    ``algorithm.rollout_correction.bypass_mode=True``. TransferQueue (the v1 trainer's data store)
    is not installed here; a dict-backed stand-in for its two calls (``kv_batch_get`` /
    ``kv_batch_put``) holds the batch. Returns the stored ``old_log_probs`` and the loss_mode the
    config holds afterwards."""
    from tensordict import TensorDict

    store: dict[str, TensorDict] = {}
    if "transfer_queue" not in sys.modules:
        tq = types.ModuleType("transfer_queue")

        class KVBatchMeta(types.SimpleNamespace):
            pass

        tq.KVBatchMeta = KVBatchMeta
        tq.BatchMeta = type("BatchMeta", (), {})
        sys.modules["transfer_queue"] = tq
    tq = sys.modules["transfer_queue"]

    def kv_batch_get(keys: list, partition_id: str, select_fields: list[str]) -> TensorDict:
        return store[partition_id].select(*select_fields).clone()

    def kv_batch_put(keys: list, partition_id: str, fields: TensorDict) -> Any:
        store[partition_id].update(fields)
        return meta

    tq.kv_batch_get, tq.kv_batch_put = kv_batch_get, kv_batch_put
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    bsz = batch.batch.batch_size[0]
    store["train"] = TensorDict(
        {"rollout_log_probs": batch.batch["rollout_log_probs"].clone()}, batch_size=[bsz]
    )
    meta = tq.KVBatchMeta(keys=[str(i) for i in range(bsz)], partition_id="train", tags=[{}] * bsz)
    PPOTrainer._compute_old_log_prob(host, meta, {})
    loss_mode = host.config.actor_rollout_ref.actor.policy_loss.loss_mode
    return store["train"]["old_log_probs"], loss_mode


def main_step_scope(out_dir: Path) -> None:
    """Step scope: ``ess_step`` through the opt-in pre-pass worker, frozen policy
    (lr 0) and known log-ratio offsets, the same 2 optimizer steps of 8 sequences split into
    micro-batches of 1, 2, 4 and 8; ``ess`` (per call) with 1 and 8 for contrast. fp32 compute
    (``fsdp_config.mixed_precision.param_dtype=fp32``) for the exactness checks, and bf16
    (verl's default) for 1 and 8.
    Each update is repeated ``REPEATS`` times (the policy does not move) and timed."""
    import torch

    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="verl_step_"))
    vh.setup(tmp / "init")
    from ess_po.integrations.verl import enable_step_scope

    tokenizer = vh.save_model(tmp / "model")
    enable_step_scope()
    spy = LossSpy(["ess", "ess_step"])
    result: dict[str, Any] = {"runs": {}}
    offsets = None
    for dtype, mode, micro in (
        [("fp32", "ess_step", m) for m in (1, 2, 4, 8)]
        + [("fp32", "ess", 1), ("fp32", "ess", 8)]
        + [("bf16", mode, m) for mode in ("ess_step", "ess") for m in (1, 8)]
    ):
        host, grads = build_worker(
            tmp / "model",
            mode,
            lr=0.0,
            micro=micro,
            extra=[f"+actor_rollout_ref.actor.fsdp_config.mixed_precision={{param_dtype:{dtype}}}"],
        )
        batch, offsets = with_known_offsets(host, rollout_batch(tokenizer), offsets)
        seconds, first = [], len(spy.calls)
        for _ in range(REPEATS):
            start = time.perf_counter()
            metrics = update(host, batch)
            seconds.append(time.perf_counter() - start)
        steps = 2
        result["runs"][f"{mode}_micro{micro}_{dtype}"] = {
            "grads": grads[:steps],
            "metrics": metrics,
            "calls": spy.calls[first : first + steps * 8 // micro],
            "seconds": seconds,
            "micro": micro,
        }
    result["offsets"] = offsets
    result["response_mask"] = batch.batch["response_mask"].clone()
    result["seconds"] = time.time() - t0
    torch.save(result, out_dir / "result.pt")
    print(f"done in {result['seconds']:.1f} s")


def main_free_path(out_dir: Path) -> None:
    """Free path of ``ess_step``: verl recomputes ``old_log_prob`` with the actor right
    before the update (``RayPPOTrainer._compute_old_log_prob``), lr 2e-2, 16 sequences = 2
    optimizer steps of 8. fp32 compute: free path allowed (``enable_step_scope()``) with
    micro-batches of 1, 2, 4 and 8, and always the pre-pass (``free_path=False``) with 1 and 8;
    bf16 (verl's default) with 8, free and pre-pass. Per run: gradients of each optimizer step,
    loss calls, and the pre-pass forwards counted during the update. Then, on the free micro-2
    worker, a second update of the same batch without recompute (the parameters moved), and a
    free-path worker in rollout-correction bypass mode (old_log_prob = rollout log-probs, after
    a recompute whose output the trainer does not use)."""
    import torch

    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="verl_free_"))
    vh.setup(tmp / "init")
    from ess_po.integrations.verl import enable_step_scope

    tokenizer = vh.save_model(tmp / "model")
    enable_step_scope()
    spy = LossSpy(["ess_step"])
    result: dict[str, Any] = {"runs": {}}

    def run(host: Any, grads: list, batch: Any) -> dict[str, Any]:
        first, forwards = len(spy.calls), host.forward_only_calls
        metrics = update(host, batch)
        return {
            "grads": grads[-2:],
            "metrics": metrics,
            "calls": spy.calls[first:],
            "prepass_forwards": host.forward_only_calls - forwards,
        }

    runs = [("fp32", True, m) for m in (1, 2, 4, 8)] + [("fp32", False, 1), ("fp32", False, 8)]
    runs += [("bf16", True, 8), ("bf16", False, 8)]
    for dtype, free, micro in runs:
        enable_step_scope(free_path=free)
        host, grads = build_worker(
            tmp / "model",
            "ess_step",
            lr=2e-2,
            micro=micro,
            extra=[f"+actor_rollout_ref.actor.fsdp_config.mixed_precision={{param_dtype:{dtype}}}"],
        )
        batch = rollout_batch(tokenizer)
        batch = batch.union(old_log_prob(host, batch))
        key = f"{'free' if free else 'prepass'}_micro{micro}_{dtype}"
        result["runs"][key] = run(host, grads, batch)
        if (free, micro, dtype) == (True, 2, "fp32"):
            result["runs"]["again_micro2_fp32"] = run(host, grads, batch)

    enable_step_scope(free_path=True)
    host, grads = build_worker(
        tmp / "model",
        "ess_step",
        lr=2e-2,
        extra=[
            "algorithm.rollout_correction.bypass_mode=True",
            "actor_rollout_ref.rollout.calculate_log_probs=True",
            "+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:fp32}",
        ],
    )
    batch = rollout_batch(tokenizer)
    recomputed = old_log_prob(host, batch)  # recorded by the worker, then unused
    g = torch.Generator().manual_seed(2)
    rollout = recomputed.batch["old_log_probs"] + 0.3 * torch.randn(
        recomputed.batch["old_log_probs"].shape, generator=g
    )
    batch.batch["rollout_log_probs"] = rollout * batch.batch["response_mask"]
    batch.batch["old_log_probs"], _ = v1_bypass_old_log_prob(host, batch)
    result["runs"]["bypass_micro2_fp32"] = run(host, grads, batch)
    result["runs"]["bypass_micro2_fp32"]["rollout_log_probs"] = batch.batch["rollout_log_probs"]
    result["response_mask"] = batch.batch["response_mask"].clone()
    result["seconds"] = time.time() - t0
    torch.save(result, out_dir / "result.pt")
    print(f"done in {result['seconds']:.1f} s")


class RankView:
    """This rank's side of verl's worker group, for a trainer method called on every rank.

    verl's Ray worker group dispatches ``update_actor`` (``make_nd_compute_dataproto_dispatch_fn``)
    by splitting the batch into ``dp_size`` chunks with verl's own
    ``_split_args_kwargs_data_proto`` and handing chunk ``r`` to rank ``r``; here each rank
    takes its chunk from the same function. ``compute_log_prob`` runs on the whole batch on
    every rank (the FSDP forward is collective, the data need not differ), so each rank holds
    all ``old_log_probs`` without a gather."""

    def __init__(self, worker: Any) -> None:
        import torch.distributed as dist

        self.worker, self.rank, self.world = worker, dist.get_rank(), dist.get_world_size()

    def compute_log_prob(self, data: Any) -> Any:
        return self.worker.compute_log_prob(data)

    def update_actor(self, data: Any) -> Any:
        from verl.single_controller.base.decorator import _split_args_kwargs_data_proto

        (chunks,), _ = _split_args_kwargs_data_proto(self.world, data)
        # Ray hands the worker a deserialised copy of its chunk (the chunk itself is a locked
        # view of the batch, which verl's worker modifies in place).
        return self.worker.update_actor(pickle.loads(pickle.dumps(chunks[self.rank])))


def rank_order(world: int) -> list[int]:
    """Row order handed to the trainer so that, after verl's dispatch (rank ``r`` gets chunk
    ``r``) and mini-batch split (consecutive rows of each chunk), optimizer step ``s`` trains
    rows ``8 s .. 8 s + 7`` on every world size: rank ``r`` holds rows ``8 s + 4 r .. + 3``."""
    per_rank = 8 // world
    return [
        8 * s + per_rank * r + i for r in range(world) for s in range(2) for i in range(per_rank)
    ]


def main_ranks(out_dir: Path) -> None:
    """Step scope over data-parallel ranks, one rank of a ``torchrun`` group (1 or 2
    gloo processes): the same 2 optimizer steps of 8 sequences (frozen policy, known log-ratio
    offsets, fp32 compute) with ``ess_step`` and ``ess``, micro-batches of 1 and 4 sequences per
    rank. Writes ``OUT_DIR/rank{RANK}.pt``: per run the gradients of each optimizer step (full
    tensors, identical on every rank), this rank's loss calls and the reduced metrics."""
    import torch
    import torch.distributed as dist

    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="verl_ranks_"))
    vh.setup(tmp / "init")
    from ess_po.integrations.verl import enable_step_scope

    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer = vh.save_model(tmp / "model")
    enable_step_scope()
    spy = LossSpy(["ess", "ess_step"])
    result: dict[str, Any] = {"runs": {}, "world": world, "rank": rank}
    offsets = None
    for mode in ("ess_step", "ess"):
        for micro in (1, 4):
            host, grads = build_worker(
                tmp / "model",
                mode,
                lr=0.0,
                micro=micro,
                extra=["+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:fp32}"],
            )
            host.actor_rollout_wg = RankView(host.actor_rollout_wg)
            batch, offsets = with_known_offsets(host, rollout_batch(tokenizer), offsets)
            first = len(spy.calls)
            metrics = update(host, batch.select_idxs(rank_order(world)))
            result["runs"][f"{mode}_micro{micro}"] = {
                "grads": grads[:2],
                "metrics": metrics,
                "calls": spy.calls[first:],
                "micro": micro,
                "old_log_probs": batch.batch["old_log_probs"].clone(),
            }
    # Free path: old_log_prob recomputed by the actor and used as is (on-policy first step).
    host, grads = build_worker(
        tmp / "model",
        "ess_step",
        lr=0.0,
        micro=1,
        extra=["+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:fp32}"],
    )
    host.actor_rollout_wg = RankView(host.actor_rollout_wg)
    onpolicy = rollout_batch(tokenizer)
    onpolicy = onpolicy.union(old_log_prob(host, onpolicy))
    first, forwards = len(spy.calls), host.forward_only_calls
    metrics = update(host, onpolicy.select_idxs(rank_order(world)))
    result["runs"]["ess_step_onpolicy_micro1"] = {
        "grads": grads[:2],
        "metrics": metrics,
        "calls": spy.calls[first:],
        "prepass_forwards": host.forward_only_calls - forwards,
    }
    result["offsets"] = offsets
    result["response_mask"] = batch.batch["response_mask"].clone()
    result["seconds"] = time.time() - t0
    torch.save(result, out_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} of {world} done in {result['seconds']:.1f} s")


def main(out_dir: Path) -> None:
    import torch

    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="verl_actor_"))
    vh.setup(tmp / "init")
    tokenizer = vh.save_model(tmp / "model")
    spy = LossSpy(["vanilla", "ess", "ess_seq"])
    result: dict[str, Any] = {"runs": {}}

    # 1. vanilla / ess / ess_seq from the same weights, old_log_prob recomputed by verl.
    for mode in ("vanilla", "ess", "ess_seq"):
        host, grads = build_worker(tmp / "model", mode, lr=2e-2)
        batch = rollout_batch(tokenizer)
        batch = batch.union(old_log_prob(host, batch))
        result.setdefault("initial_weights", weights(host))
        first = len(spy.calls)
        metrics = update(host, batch)
        result["runs"][mode] = {
            "grads": grads,
            "metrics": metrics,
            "calls": spy.calls[first:],
            "weights": weights(host),
        }

    # 2. Known off-policy offsets, policy frozen (lr 0): every call's ESS is predictable.
    host, grads = build_worker(tmp / "model", "ess", lr=0.0)
    batch, offsets = with_known_offsets(host, rollout_batch(tokenizer))
    first = len(spy.calls)
    metrics = update(host, batch)
    result["runs"]["ess_fixed"] = {
        "grads": grads,
        "metrics": metrics,
        "calls": spy.calls[first:],
        "offsets": offsets,
        "old_log_probs": batch.batch["old_log_probs"].clone(),
    }

    # 3. Rollout-correction bypass mode (v1 trainer): rollout log-probs become old_log_prob.
    host, grads = build_worker(
        tmp / "model",
        "ess",
        lr=0.0,
        extra=[
            "algorithm.rollout_correction.bypass_mode=True",
            "actor_rollout_ref.rollout.calculate_log_probs=True",
        ],
    )
    batch = rollout_batch(tokenizer)
    recomputed = old_log_prob(host, batch)
    g = torch.Generator().manual_seed(2)
    rollout = recomputed.batch["old_log_probs"] + 0.3 * torch.randn(
        recomputed.batch["old_log_probs"].shape, generator=g
    )
    batch.batch["rollout_log_probs"] = rollout * batch.batch["response_mask"]
    stored, loss_mode = v1_bypass_old_log_prob(host, batch)
    batch.batch["old_log_probs"] = stored
    first = len(spy.calls)
    metrics = update(host, batch)
    result["runs"]["ess_bypass"] = {
        "metrics": metrics,
        "calls": spy.calls[first:],
        "rollout_log_probs": batch.batch["rollout_log_probs"].clone(),
        "loss_mode_after": loss_mode,
        "recomputed": recomputed.batch["old_log_probs"].clone(),
    }

    result["response_mask"] = batch.batch["response_mask"].clone()
    result["seconds"] = time.time() - t0
    torch.save(result, out_dir / "result.pt")
    print(f"done in {result['seconds']:.1f} s")


if __name__ == "__main__":
    if sys.argv[2:] == ["step"]:
        main_step_scope(Path(sys.argv[1]))
    elif sys.argv[2:] == ["free"]:
        main_free_path(Path(sys.argv[1]))
    elif sys.argv[2:] == ["ranks"]:
        main_ranks(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]))
