"""One rank of AReaL's real FSDP actor engine on CPU (gloo), driven through the scenarios that
``tests/areal/`` check; run under torchrun by :func:`run_worker` and records every rank's
results with ``torch.save`` to ``<out>/<scenario>.rank<r>.pt``.

The engine: AReaL 1.0.4's ``FSDPPPOActor`` with the ESS actor
(:func:`ess_po.testing.areal_engine.build_engine`: FSDP2, ``attn_impl="sdpa"``, float32 unless
the scenario says otherwise) on a tiny Qwen2 built in code. Gradients are read after
``ppo_update`` with ``lr=0`` and gradient clipping at 1e9
(:func:`ess_po.testing.areal_engine.build_optimizer_default`).

Scenarios:

* ``grad`` (1 rank): AReaL's ``PPOActor`` (its ``grpo_loss_fn``) and ``ESSPPOActor`` on the
  same engine and batch, on-policy and off-policy, with the naive float64 reference loss
  (:func:`reference_loss`) trained through the same engine.
* ``layout`` (1 or 2 ranks): one off-policy step with one sequence per micro-batch
  (``max_tokens_per_mb=13``), so no two sequences share a packed row: ESS and gradients must not
  depend on how the batch is split into micro-batches and ranks. ``--empty-rank`` gives rank 1
  no valid token.
* ``steps`` (1 rank): ``ppo_n_minibatches=2`` with ``lr > 0``: the first optimizer step takes
  the free path, the second a no-grad forward; each step's ESS is checked against the log-probs
  its loss calls received.
* ``bf16`` (1 rank): the engine in bfloat16 beside float32 behaviour log-probs.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ess_po.testing.areal_engine import build_engine, build_optimizer_default

HERE = Path(__file__).resolve()
MAX_LEN = 13  # longest sequence of the batch: max_tokens_per_mb=13 holds one sequence
N_SEQS = 8
#: prompt and response lengths: 7..13 tokens, so two never fit in one 13-token micro-batch, and
#: packed micro-batches hold unequal numbers of valid tokens
PROMPTS = [3, 5, 3, 6, 2, 4, 3, 5]
RESPONSES = [4, 8, 5, 3, 9, 6, 4, 7]


def run_worker(scenario: str, out: Path, nprocs: int = 1, *extra: str, timeout: float = 600):
    """Run ``scenario`` on ``nprocs`` gloo ranks; returns each rank's record (a list)."""
    from ess_po.testing.processes import child_env, run_ranks

    env = child_env(AREAL_LOG_LEVEL="WARNING")
    run_ranks(HERE, nprocs, [scenario, str(out), *extra], env=env, timeout=timeout)
    return [torch.load(out / f"{scenario}.rank{r}.pt", weights_only=False) for r in range(nprocs)]


# --- the batch ----------------------------------------------------------------------------


def make_batch(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``N_SEQS`` trajectories as AReaL's rollout hands them over (one ``[1, L]`` dict each):
    prompt + response, lengths 7..13 (two never fit in 13 tokens), rewards of mixed sign."""
    g = torch.Generator().manual_seed(seed)
    rewards = [1.0, -0.5, 2.0, 0.0, -1.0, 0.5, 1.5, -2.0]
    out = []
    for i in range(N_SEQS):
        prompt, response = PROMPTS[i], RESPONSES[i]
        length = prompt + response
        ids = torch.randint(3, 9, (1, length), generator=g)  # the tiny tokenizer has 10 ids
        loss_mask = torch.zeros(1, length, dtype=torch.int32)
        loss_mask[0, prompt:] = 1
        out.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones(1, length, dtype=torch.bool),
                "loss_mask": loss_mask,
                "logprobs": torch.zeros(1, length),  # replaced by behaviour_logprobs
                "versions": torch.where(loss_mask.bool(), 0, -1).to(torch.int32),
                "rewards": torch.tensor([rewards[i]]),
                # this trajectory's behaviour noise: the same whatever rank it lands on
                "noise": torch.randn((1, length), generator=g),
            }
        )
    return out


def behaviour_logprobs(batch: list[dict], prox: list[torch.Tensor], noise: float) -> None:
    """Set each trajectory's inference log-probs (aligned with its tokens, as AReaL's rollout
    stores them) to the recomputed ones plus ``noise`` times its own Gaussian draw."""
    for traj, lp in zip(batch, prox, strict=True):
        aligned = torch.roll(lp, 1, -1)  # prox_logp[t] is the log-prob of token t + 1
        bump = noise * traj.pop("noise")
        traj["logprobs"] = torch.where(traj["loss_mask"].bool(), aligned + bump, 0.0)
        traj["prox_logp"] = lp


# --- the engine ---------------------------------------------------------------------------


def record_calls(engine: Any) -> list[dict[str, Any]]:
    """Record, on the engine instance, what each ``train_batch`` loss call receives (without
    changing it) and which loss the step used; returns the list the steps are appended to."""
    steps: list[dict[str, Any]] = []
    train_batch = engine.train_batch

    def recorded(input_: Any, loss_fn: Any, loss_weight_fn: Any) -> Any:
        calls: list[dict[str, torch.Tensor]] = []

        def loss(logprobs, entropy, input_data, **kwargs):
            calls.append(
                {
                    "logprobs": logprobs.detach().clone(),
                    "dtype": str(logprobs.dtype),
                    "old": input_data["logprobs"].detach().clone(),
                    "mask": input_data["loss_mask"].detach().clone(),
                    "cu_seqlens": input_data["cu_seqlens"].detach().clone(),
                }
            )
            return loss_fn(logprobs, entropy, input_data, **kwargs)

        stats = getattr(loss_fn, "stats", None)
        steps.append(
            {
                "loss": type(loss_fn).__name__
                if not hasattr(loss_fn, "func")
                else loss_fn.func.__name__,
                "calls": calls,
                "ess": None if stats is None else stats.ess().clone(),
                "free": getattr(loss_fn, "free", None),
            }
        )
        return train_batch(input_, loss, loss_weight_fn)

    engine.train_batch = recorded
    return steps


def gradients(engine: Any) -> dict[str, torch.Tensor]:
    grads = {}
    for name, p in engine.model.named_parameters():
        g = p.grad
        grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return grads


def naive_ess(d: torch.Tensor, mask: torch.Tensor, group: Any = None) -> torch.Tensor:
    """``(Σw)² / (n Σw²)`` in float64 from plain sums, all-reduced over ``group``: the ranks'
    version of :func:`ess_po.testing.reference.naive_ess`."""
    w = torch.where(mask.bool(), d.double().exp(), 0.0)
    sums = torch.stack([w.sum(), (w * w).sum(), mask.bool().sum().double()])
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(sums, group=group)
    return sums[0] ** 2 / (sums[2] * sums[1])


def reference_loss(ess: torch.Tensor | None):
    """The naive float64 objective (:func:`ess_po.testing.reference.naive_ess_loss`) as an
    ``engine.train_batch`` loss: the micro-batch's token mean, with the given ESS (the step's) or,
    ``ess=None``, the micro-batch's own."""
    from ess_po.testing.reference import naive_ess_loss

    def loss(logprobs, entropy, input_data, **kwargs):
        row = (1, -1)  # the packed micro-batch as one row
        return naive_ess_loss(
            logprobs.view(row),
            input_data["logprobs"].view(row),
            input_data["advantages"].view(row),
            input_data["loss_mask"].view(row),
            ess=ess,
        )

    return loss


def local_batch(batch: list[dict], world: int, rank: int) -> list[dict]:
    share = len(batch) // world
    return batch[rank * share : (rank + 1) * share]


def prepare(actor: Any, batch: list[dict], noise: float) -> list[dict]:
    """compute_logp -> behaviour log-probs (recomputed + noise) -> compute_advantages."""
    batch = copy.deepcopy(batch)
    prox = actor.compute_logp(batch)
    behaviour_logprobs(batch, prox, noise)
    return actor.compute_advantages(batch)


def export(engine: Any, local: bool = False) -> dict[str, float]:
    from areal.utils import stats_tracker

    return stats_tracker.export_all(reduce_group=None if local else engine.data_parallel_group)


# --- scenarios ----------------------------------------------------------------------------


def scenario_grad(engine: Any, world: int, rank: int) -> dict[str, Any]:
    from areal.trainer.ppo.actor import PPOActor

    from ess_po.integrations.areal import ESSPPOActor

    steps = record_calls(engine)
    cfg = engine.config
    base = make_batch()
    out: dict[str, Any] = {}

    def run(actor: Any, data: list[dict], tag: str) -> None:
        actor.ppo_update(copy.deepcopy(data))
        out[f"grad/{tag}"] = gradients(engine)
        out[f"stats/{tag}"] = export(engine)
        out[f"steps/{tag}"] = list(steps)
        steps.clear()

    for decoupled in (False, True):
        mode = "off" if decoupled else "on"
        config = dataclasses.replace(cfg, use_decoupled_loss=decoupled)
        grpo = PPOActor(config, engine)
        data = prepare(grpo, base, noise=0.5 if decoupled else 0.0)
        run(grpo, data, f"grpo_{mode}")
        for scope, free in (("step", True), ("step", False), ("call", True)):
            ess_cfg = dataclasses.replace(config, ess_scope=scope, ess_free_path=free)
            ess_actor = ESSPPOActor(ess_cfg, engine)
            ess_actor.logp_at_step = ess_actor.optimizer_steps  # compute_logp ran (in prepare)
            run(ess_actor, data, f"ess_{scope}{'' if free else '_prepass'}_{mode}")
        # the naive float64 reference through the same engine: step ESS from all valid tokens
        merged = data  # one mini-batch: the whole batch is the step
        d = torch.cat([(t["prox_logp"] - t["logprobs"]).flatten() for t in merged])
        m = torch.cat([t["loss_mask"].flatten() for t in merged])
        step_ess = naive_ess(d, m, engine.data_parallel_group)
        out[f"ess_naive_{mode}"] = step_ess
        for tag, ess in ((f"ref_step_{mode}", step_ess), (f"ref_call_{mode}", None)):
            from areal.utils.data import concat_padded_tensors

            mb = concat_padded_tensors(copy.deepcopy(data))
            for key in ("rewards", "tot_rewards", "kl_rewards"):
                mb.pop(key, None)
            engine.train()
            engine.train_batch(mb, reference_loss(ess), lambda x: x["loss_mask"].count_nonzero())
            out[f"grad/{tag}"] = gradients(engine)
            export(engine)
            steps.clear()
    return out


def scenario_layout(
    engine: Any, world: int, rank: int, empty_rank: bool, host_loss: bool, areal_export: bool
) -> dict[str, Any]:
    from areal.trainer.ppo.actor import PPOActor

    steps = record_calls(engine)
    actor = PPOActor(engine.config, engine) if host_loss else engine.actor
    batch = make_batch()
    if empty_rank:  # rank 1's share (the second half) has no valid token
        for traj in batch[N_SEQS // 2 :]:
            traj["loss_mask"] = torch.zeros_like(traj["loss_mask"])
    # behaviour log-probs from the full batch on every layout: the same numbers everywhere
    mine = local_batch(batch, world, rank)
    data = prepare(actor, mine, noise=0.5)
    actor.ppo_update(copy.deepcopy(data))
    d = torch.cat([(t["prox_logp"] - t["logprobs"]).flatten() for t in data])
    m = torch.cat([t["loss_mask"].flatten() for t in data])
    # With a rank that skipped every loss call, the ranks' stats keys differ and AReaL's
    # all-reduced export fails (its own GRPO loss too: see the test); export each rank's own.
    calls = [c for step in steps for c in step["calls"]]
    seen_d = torch.cat([c["logprobs"] - c["old"] for c in calls]) if calls else torch.zeros(0)
    seen_m = torch.cat([c["mask"] for c in calls]) if calls else torch.zeros(0)
    return {
        "grad": gradients(engine),
        "stats": export(engine, local=empty_rank and not areal_export),
        "steps": steps,
        "ess_naive": naive_ess(d, m, engine.data_parallel_group),
        "ess_naive_calls": naive_ess(seen_d, seen_m, engine.data_parallel_group),
    }


def scenario_steps(engine: Any, world: int, rank: int) -> dict[str, Any]:
    steps = record_calls(engine)
    data = prepare(engine.actor, make_batch(), noise=0.5)
    engine.actor.ppo_update(copy.deepcopy(data))
    naive = []
    for step in steps:
        d = torch.cat([(c["logprobs"] - c["old"]) for c in step["calls"]])
        m = torch.cat([c["mask"] for c in step["calls"]])
        naive.append(naive_ess(d, m, engine.data_parallel_group))
    return {
        "steps": steps,
        "ess_naive": naive,
        "stats": export(engine),
        "engine_type": type(engine).__name__,
        "actor_type": type(engine.actor).__name__,
    }


def scenario_bf16(engine: Any, world: int, rank: int) -> dict[str, Any]:
    from areal.utils.data import concat_padded_tensors

    steps = record_calls(engine)
    logits_dtypes: set[str] = set()
    engine.model.register_forward_hook(
        lambda module, args, output: logits_dtypes.add(str(output.logits.dtype))
    )
    data = prepare(engine.actor, make_batch(), noise=0.5)
    engine.actor.ppo_update(copy.deepcopy(data))
    out = {"grad": gradients(engine), "stats": export(engine), "steps": list(steps)}
    calls = steps[0]["calls"]
    d = torch.cat([(c["logprobs"].double() - c["old"].double()) for c in calls])
    m = torch.cat([c["mask"] for c in calls])
    out["ess_naive_seen"] = ess = naive_ess(d, m)
    mb = concat_padded_tensors(copy.deepcopy(data))
    for key in ("rewards", "tot_rewards", "kl_rewards"):
        mb.pop(key, None)
    engine.train()
    engine.train_batch(mb, reference_loss(ess), lambda x: x["loss_mask"].count_nonzero())
    out["grad_ref"] = gradients(engine)
    out["logits_dtypes"] = sorted(logits_dtypes)
    export(engine)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["grad", "layout", "steps", "bf16"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--empty-rank", action="store_true")
    parser.add_argument("--host-loss", action="store_true", help="AReaL's own PPOActor")
    parser.add_argument(
        "--areal-export", action="store_true", help="all-reduced export even with --empty-rank"
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.manual_seed(0)

    from ess_po.testing.tiny import save_tiny_model

    model_dir = args.out / "model"
    if rank == 0 and not (model_dir / "config.json").exists():
        save_tiny_model(model_dir, seed=0)
    if world > 1:  # the model directory must exist before any rank loads it
        import time

        while not (model_dir / "model.safetensors").exists():
            time.sleep(0.2)
        time.sleep(0.5)

    overrides: dict[str, Any] = {}
    if args.scenario == "layout":
        from areal.api.cli_args import MicroBatchSpec

        overrides["mb_spec"] = MicroBatchSpec(n_mbs=1, max_tokens_per_mb=MAX_LEN)
    if args.scenario == "steps":
        overrides["ppo_n_minibatches"] = 2
        overrides["use_decoupled_loss"] = True
        overrides["optimizer"] = dataclasses.replace(build_optimizer_default(), lr=1e-2)
    if args.scenario == "bf16":
        overrides["dtype"] = "bfloat16"
        overrides["use_decoupled_loss"] = True
        overrides["ess_free_path"] = False  # the ESS from a bfloat16 forward
    if args.scenario == "layout":
        overrides["use_decoupled_loss"] = True
    via_trainer = args.scenario == "steps"
    engine = build_engine(str(model_dir), world, via_trainer=via_trainer, **overrides)
    if args.scenario == "grad":
        record = scenario_grad(engine, world, rank)
    elif args.scenario == "layout":
        record = scenario_layout(
            engine, world, rank, args.empty_rank, args.host_loss, args.areal_export
        )
    elif args.scenario == "steps":
        record = scenario_steps(engine, world, rank)
    else:
        record = scenario_bf16(engine, world, rank)
    torch.save(record, args.out / f"{args.scenario}.rank{rank}.pt")
    engine.destroy()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
