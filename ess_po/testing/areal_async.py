"""Asynchronous RL with the ESS objective inside AReaL 1.0.4: AReaL's own rollout orchestration
(``WorkflowExecutor`` and its ``StalenessManager``), a ``RolloutWorkflow`` and a stand-in
inference engine, feeding AReaL's FSDP2 actor engine (gloo, CPU).

Run as one torchrun rank (:func:`run_async` launches it)::

    python -m ess_po.testing.areal_async OUT --steps N --offpolicyness K --loss {ess,grpo}

The pieces, all AReaL's except the two small classes below:

* :class:`StandInEngine` (an ``areal.api.engine_api.InferenceEngine``): no SGLang or vLLM server
  can run here, so a CPU copy of the policy (a transformers ``Qwen2ForCausalLM``) samples at
  temperature 1 and returns each sampled token's log-prob under its own weights and its weight
  version. The trainer pushes its full state dict after every step (under a lock, with the new
  version), as AReaL's trainer does with ``update_weights`` + ``set_version``.
* :class:`GroupWorkflow` (an ``areal.api.workflow_api.RolloutWorkflow``): one prompt, a group of
  ``G`` completions, the task's reward; returns AReaL's padded trajectory dict (``[G, L]``
  ``input_ids``, ``attention_mask``, ``loss_mask``, ``logprobs``, ``versions``; ``rewards [G]``),
  with the conventions of ``areal.workflow.rlvr`` (behaviour log-probs at the token positions,
  0 and version -1 on the prompt).
* ``areal.infra.workflow_executor.WorkflowExecutor`` runs the workflow in AReaL's background
  asyncio thread; its ``StalenessManager`` admits a rollout only while
  ``accepted + running < (max_head_offpolicyness + version + 1) * consumer_batch_size``, with
  the stand-in engine as the version provider.
* The trainer: ``ESSFSDPPPOActor`` built by ``ess_po.testing.areal_engine.build_engine`` (AReaL's
  ``FSDPPPOActor`` with the ESS loss), decoupled mode, recomputed proximal log-probs, rewards
  normalised per group and advantages over the batch (``NormConfig``, as AReaL's gsm8k GRPO
  example), per step ``compute_logp`` -> ``compute_advantages`` -> ``ppo_update`` ->
  ``set_version`` -> weights to the stand-in -> ``stats_tracker.export_all``. ``--loss grpo``
  swaps in AReaL's own ``PPOActor`` (its decoupled PPO loss, with the behaviour-ratio cap of 5
  of that example: ``RejectionSamplingConfig()``) on the same engine.

Two things about AReaL 1.0.4 that this script works around, each measured here:

* ``prepare_batch`` submits one batch of prompts, then waits up to 1 s for results before it
  submits the next, so it runs ahead of the trainer only when a batch takes longer than that to
  generate. The stand-in samples a batch in ~0.1 s: with ``--driver prepare_batch`` every batch
  is on-policy (staleness 0). The default driver (``submit``) keeps ``K + 1`` batches of prompts
  submitted with ``WorkflowExecutor.submit`` and takes each batch with ``wait``; admission stays
  with AReaL's ``StalenessManager``, as in a long AReaL run where generation is the slow part.
* AReaL's FSDP engine packs a micro-batch's sequences into one row and hands the model
  ``cu_seq_lens`` with no attention mask. Its default ``attn_impl``, ``flash_attention_2``
  (GPU only), honours ``cu_seq_lens``; ``sdpa``, which AReaL also accepts and which runs on a
  CPU, ignores them and applies one causal mask to the whole row, so each packed sequence
  attends to the ones packed before it. At identical weights that put
  the trainer's log-probs far from the sampler's (ESS 0.21 on a batch of 64 completions). The
  trainer here runs one sequence per micro-batch (``MicroBatchSpec(n_mbs=len(batch))``); its
  log-probs then match the stand-in's to float32 rounding (1 - ESS ~ 1e-14 at staleness 0).

The staleness bound: sample ``i`` (counted in admission order; none are rejected here) is
admitted at a version ``v >= floor(i / B) - K`` and generated at a version at least that. The
stand-in samples inside the event loop without yielding, so rollouts finish in admission order,
``wait`` (like ``prepare_batch``) hands the earliest-started finished ones over first, and
sample ``i`` is trained in step ``floor(i / B)``: staleness <= ``K``. It is lower when a rollout
starts later than its admission allowed (the sampler falling behind the trainer). (A server
that finishes requests out of order can push a slow rollout into a later batch, past ``K``:
AReaL bounds admission; it does not filter stale samples when they are consumed.)

Writes ``OUT/async_<loss>.json``: the run's settings and one record per step (reward, the ESS
diagnostics AReaL's tracker exported, AReaL's staleness and the staleness measured here from
``versions``, grad norm, timings).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from areal.api.engine_api import InferenceEngine
from areal.api.io_struct import ModelRequest, ModelResponse
from areal.api.workflow_api import RolloutWorkflow

LOSSES = ("ess", "grpo")
UPDATE = "ppo_actor/update/"
#: exported stats kept in each step's record (the ESS ones exist only with the ESS loss)
KEPT_STATS = (
    f"{UPDATE}ess",
    f"{UPDATE}ess_min",
    f"{UPDATE}ess_capped_frac",
    f"{UPDATE}ess_capped_mass",
    f"{UPDATE}ess_kl_behavior",
    f"{UPDATE}ess_step_free",
    f"{UPDATE}version_stats/sample_staleness_theta/avg",
    f"{UPDATE}version_stats/sample_staleness_theta/max",
    f"{UPDATE}version_stats/sample_staleness_theta_avg",
    f"{UPDATE}version_stats/sample_staleness_theta_max",
    f"{UPDATE}grad_norm",
    f"{UPDATE}importance_weight/avg",
    f"{UPDATE}clip_mask/avg",
    f"{UPDATE}behave_imp_weight/avg",
    f"{UPDATE}filtered_fraction",
    f"{UPDATE}actor_loss/avg",
    f"{UPDATE}entropy/avg",
    "ppo_actor/task_reward/avg",
)


def run_async(
    out: str | os.PathLike[str],
    steps: int,
    offpolicyness: int,
    loss: str,
    timeout: float = 600.0,
    **options: Any,
) -> dict[str, Any]:
    """Run :func:`main` as one gloo rank under torchrun; returns what it wrote to
    ``OUT/async_<loss>.json``. ``options`` are further flags (``seed=1`` -> ``--seed 1``)."""
    from ess_po.testing.processes import child_env, run_ranks

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    args = [str(out), "--steps", str(steps), "--offpolicyness", str(offpolicyness)]
    args += ["--loss", loss]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    env = child_env(AREAL_LOG_LEVEL="WARNING", PYTHONWARNINGS="ignore")
    run_ranks("ess_po.testing.areal_async", 1, args, env=env, timeout=timeout)
    return json.loads((out / f"async_{loss}.json").read_text())


# --- the stand-in inference engine -----------------------------------------------------------


class StandInEngine(InferenceEngine):
    """An in-process sampler in place of AReaL's remote SGLang/vLLM engine.

    What ``WorkflowExecutor`` needs of an inference engine is ``get_version`` (its
    ``StalenessManager``'s version provider) and whatever the workflow calls: here
    :meth:`agenerate` (AReaL's request/response API, one completion) and :meth:`agenerate_group`
    (``req.gconfig.n_samples`` completions of one prompt in one batched pass). Sampling holds
    :attr:`lock`, so a weight update (:meth:`update_weights`) never lands mid-completion: every
    token of a completion carries the one version it was sampled under.
    """

    def __init__(self, model_dir: str | os.PathLike[str], *, seed: int = 0) -> None:
        from transformers import Qwen2ForCausalLM

        self.model = Qwen2ForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="sdpa"
        ).eval()
        self.lock = threading.Lock()
        self.generator = torch.Generator().manual_seed(seed)
        self.vocab_size = self.model.config.vocab_size
        self._version = 0
        self.completions = 0  # completions sampled so far

    @property
    def initialized(self) -> bool:
        return True

    def initialize(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to launch or connect to."""

    def destroy(self) -> None:
        """Nothing to release."""

    def get_version(self) -> int:
        return self._version

    def set_version(self, version: int) -> None:
        with self.lock:
            self._version = version

    def update_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Load the trainer's full state dict and take its version, between two completions."""
        with self.lock:
            self.model.load_state_dict(state_dict, strict=True)
            self._version = version

    @torch.no_grad()
    def sample(
        self, input_ids: list[int], n: int, max_new_tokens: int, stop_ids: list[int]
    ) -> tuple[list[list[int]], list[list[float]], int]:
        """``n`` completions of ``input_ids`` at temperature 1 (plain softmax sampling): their
        tokens (each cut after its first stop token), each token's log-prob under the weights
        that sampled it, and the version of those weights."""
        with self.lock:
            version = self._version
            seq = torch.tensor([input_ids] * n, dtype=torch.long)
            tokens, logps = [], []
            stopped = torch.zeros(n, dtype=torch.bool)
            stop = torch.tensor(stop_ids, dtype=torch.long)
            for _ in range(max_new_tokens):
                logits = self.model(input_ids=seq).logits[:, -1].float()
                logp = torch.log_softmax(logits, dim=-1)
                nxt = torch.multinomial(logp.exp(), 1, generator=self.generator)
                tokens.append(nxt[:, 0])
                logps.append(logp.gather(1, nxt)[:, 0])
                seq = torch.cat([seq, nxt], dim=1)
                stopped |= torch.isin(nxt[:, 0], stop)
                if bool(stopped.all()):
                    break
            self.completions += n
        tok = torch.stack(tokens, dim=1).tolist()
        lp = torch.stack(logps, dim=1).tolist()
        out_tokens, out_logps = [], []
        for row_t, row_lp in zip(tok, lp, strict=True):
            end = next((i + 1 for i, t in enumerate(row_t) if t in stop_ids), len(row_t))
            out_tokens.append(row_t[:end])
            out_logps.append(row_lp[:end])
        return out_tokens, out_logps, version

    async def agenerate_group(self, req: ModelRequest) -> list[ModelResponse]:
        """``req.gconfig.n_samples`` completions of ``req.input_ids``. Runs on the event loop
        without yielding: rollouts finish in the order AReaL started them."""
        g = req.gconfig
        if g.greedy or g.temperature != 1.0 or g.top_p < 1.0 or 0 < g.top_k < self.vocab_size:
            raise ValueError("the stand-in engine samples at temperature 1 only (no top-k/p)")
        tokens, logps, version = self.sample(
            list(req.input_ids), g.n_samples, g.max_new_tokens, list(g.stop_token_ids)
        )
        return [
            ModelResponse(
                input_tokens=list(req.input_ids),
                output_tokens=t,
                output_logprobs=lp,
                output_versions=[version] * len(t),
                stop_reason="stop" if t and t[-1] in g.stop_token_ids else "length",
                tokenizer=req.tokenizer,
            )
            for t, lp in zip(tokens, logps, strict=True)
        ]

    async def agenerate(self, req: ModelRequest) -> ModelResponse:
        one = req.copy()
        one.gconfig = req.gconfig.new(n_samples=1)
        (resp,) = await self.agenerate_group(one)
        return resp


# --- the workflow ------------------------------------------------------------------------------


class GroupWorkflow(RolloutWorkflow):
    """One prompt of the task -> ``G`` completions from the stand-in engine -> AReaL's padded
    trajectory dict (one ``[G, L]`` dict per prompt; ``rewards`` is ``[G]``)."""

    def __init__(self, tokenizer: Any, group_size: int, max_new_tokens: int) -> None:
        from areal.api.cli_args import GenerationHyperparameters

        self.tokenizer = tokenizer
        self.gconfig = GenerationHyperparameters(
            n_samples=group_size, max_new_tokens=max_new_tokens, temperature=1.0
        ).new_with_stop_and_pad_token_ids(tokenizer)

    async def arun_episode(self, engine: StandInEngine, data: dict[str, Any]) -> dict[str, Any]:
        from ess_po.testing.tiny import copy_reward

        prompt = self.tokenizer(data["prompt"], add_special_tokens=False)["input_ids"]
        req = ModelRequest(input_ids=prompt, gconfig=self.gconfig, tokenizer=self.tokenizer)
        responses = await engine.agenerate_group(req)
        texts = [self.tokenizer.decode(r.output_tokens) for r in responses]
        rewards = copy_reward(texts, [data["answer"]] * len(texts))
        width = max(r.input_len + r.output_len for r in responses)
        pad = self.tokenizer.pad_token_id
        rows: dict[str, list[list[Any]]] = {
            k: [] for k in ("input_ids", "attention_mask", "loss_mask", "logprobs", "versions")
        }
        for r in responses:
            n_in, n_out = r.input_len, r.output_len
            fill = width - n_in - n_out
            rows["input_ids"].append(r.input_tokens + r.output_tokens + [pad] * fill)
            rows["attention_mask"].append([1] * (n_in + n_out) + [0] * fill)
            rows["loss_mask"].append([0] * n_in + [1] * n_out + [0] * fill)
            rows["logprobs"].append([0.0] * n_in + r.output_logprobs + [0.0] * fill)
            rows["versions"].append([-1] * n_in + r.output_versions + [-1] * fill)
        return {
            "input_ids": torch.tensor(rows["input_ids"], dtype=torch.int32),
            "attention_mask": torch.tensor(rows["attention_mask"], dtype=torch.bool),
            "loss_mask": torch.tensor(rows["loss_mask"], dtype=torch.int32),
            "logprobs": torch.tensor(rows["logprobs"], dtype=torch.float32),
            "versions": torch.tensor(rows["versions"], dtype=torch.int32),
            "rewards": torch.tensor(rewards, dtype=torch.float32),
        }


# --- the run -----------------------------------------------------------------------------------


def prepare_model(model_dir: Path, seed: int, warm_steps: int) -> dict[str, Any]:
    """The tiny Qwen2 and its tokenizer, briefly warm-started on the task, saved to
    ``model_dir`` (the trainer and the stand-in both load it from there)."""
    from transformers import AutoModelForCausalLM

    from ess_po.testing.tiny import build_task_dataset, build_tiny_tokenizer, save_tiny_model

    save_tiny_model(model_dir, seed=seed)
    info: dict[str, Any] = {"warm_start_steps": warm_steps}
    if warm_steps:
        from ess_po.testing.tiny import warm_start

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tok = build_tiny_tokenizer()
        losses = warm_start(
            model, tok, build_task_dataset(256, seed=seed + 1000), steps=warm_steps, seed=seed
        )
        model.save_pretrained(model_dir)
        info["warm_start_loss"] = [losses[0], losses[-1]]
    return info


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The FSDP2 model's full (unsharded) state dict on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {k: v.detach().clone() for k, v in get_model_state_dict(model, options=options).items()}


def batch_ess(batch: list[dict[str, torch.Tensor]]) -> float:
    """ESS of the step's behaviour weights ``exp(prox_logp - logprobs)`` over its valid tokens
    (after ``compute_advantages``: both aligned with the rolled ``loss_mask``), in float64."""
    from ess_po.testing.reference import naive_ess

    d = torch.cat([(t["prox_logp"].double() - t["logprobs"].double()).flatten() for t in batch])
    return float(naive_ess(d, torch.cat([t["loss_mask"].flatten() for t in batch])))


def measured_staleness(batch: list[dict[str, torch.Tensor]], version: int) -> dict[str, float]:
    """Trainer version minus the sampler version of every completion token (``loss_mask`` 1,
    before ``compute_advantages`` rolls it)."""
    vs = torch.cat([t["versions"][t["loss_mask"].bool()].flatten() for t in batch])
    assert bool((vs >= 0).all()), "a completion token without a sampler version"
    s = (version - vs).double()
    per_seq = [
        (version - row[m.bool()]).tolist()
        for t in batch
        for row, m in zip(t["versions"], t["loss_mask"], strict=True)
    ]
    return {
        "staleness_avg": float(s.mean()),
        "staleness_max": int(s.max()),
        "staleness_min": int(s.min()),
        "staleness_hist": {str(k): int((s == k).sum()) for k in sorted(set(s.long().tolist()))},
        "sequence_staleness_constant": all(len(set(x)) <= 1 for x in per_seq),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--offpolicyness", type=int, default=4, help="max_head_offpolicyness")
    p.add_argument("--loss", choices=LOSSES, default="ess")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (consumer batch)")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warm-start-steps", type=int, default=20)
    p.add_argument(
        "--driver",
        choices=["submit", "prepare_batch"],
        default="submit",
        help="how batches are taken from AReaL's executor (see the module docstring)",
    )
    args = p.parse_args()
    warnings.simplefilter("ignore")
    t_start = time.perf_counter()
    world = int(os.environ["WORLD_SIZE"])
    assert world == 1, "one trainer rank (the stand-in engine lives in its process)"
    torch.manual_seed(args.seed)
    random.seed(args.seed)  # AReaL's wait() shuffles each batch with Python's random

    import dataclasses

    from areal.api.cli_args import (
        InferenceEngineConfig,
        MicroBatchSpec,
        NormConfig,
        OptimizerConfig,
        RejectionSamplingConfig,
    )
    from areal.infra.workflow_executor import WorkflowExecutor
    from areal.trainer.ppo.actor import PPOActor
    from areal.utils import stats_tracker
    from areal.utils.data import cycle_dataloader
    from torchdata.stateful_dataloader import StatefulDataLoader

    from ess_po.testing.areal_engine import build_engine
    from ess_po.testing.tiny import build_task_dataset, build_tiny_tokenizer

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / f"model_seed{args.seed}"
    model_info = prepare_model(model_dir, args.seed, args.warm_start_steps)
    tokenizer = build_tiny_tokenizer()
    group = args.group_size

    # the trainer: AReaL's FSDP2 actor engine, decoupled PPO, GRPO-style normalisation as in
    # AReaL's gsm8k GRPO example (rewards normalised within each group, advantages over the batch)
    engine = build_engine(
        str(model_dir),
        world,
        use_decoupled_loss=True,
        recompute_logprob=True,
        ppo_n_minibatches=1,
        # one sequence per micro-batch: on CPU (sdpa) AReaL's packed micro-batches let a
        # sequence attend to the sequences packed before it (see the module docstring)
        mb_spec=MicroBatchSpec(n_mbs=args.prompts * group),
        reward_norm=NormConfig(mean_level="group", std_level="group", group_size=group),
        adv_norm=NormConfig(mean_level="batch", std_level="batch"),
        kl_ctl=0.0,
        optimizer=OptimizerConfig(
            type="adam",
            lr=args.lr,
            weight_decay=0.0,
            gradient_clipping=1.0,
            lr_scheduler_type="constant",
            warmup_steps_proportion=0.0,
        ),
    )
    if args.loss == "grpo":
        # AReaL's own decoupled PPO loss; its behaviour-ratio cap at 5 as in AReaL's GRPO example
        config = dataclasses.replace(engine.config, rejection_sampling=RejectionSamplingConfig())
        engine.actor = PPOActor(config, engine)
    actor = engine.actor

    # the rollout side: stand-in engine, workflow, prompts, AReaL's executor
    sampler = StandInEngine(model_dir, seed=args.seed)
    sampler.update_weights(full_state_dict(engine.model), engine.get_version())
    workflow = GroupWorkflow(tokenizer, group, args.max_new_tokens)
    dataset = build_task_dataset(256, seed=args.seed)
    loader = StatefulDataLoader(
        dataset,
        batch_size=args.prompts,
        shuffle=True,
        drop_last=True,
        collate_fn=_rows,
        generator=torch.Generator().manual_seed(args.seed),
    )
    rollout_config = InferenceEngineConfig(
        experiment_name="ess",
        trial_name="async",
        backend="standin:d1",
        consumer_batch_size=args.prompts,
        max_head_offpolicyness=args.offpolicyness,
        max_concurrent_rollouts=args.prompts,
    )
    executor = WorkflowExecutor(rollout_config, sampler)
    executor.initialize(train_data_parallel_size=world)
    setup_s = time.perf_counter() - t_start

    prompts = (row for rows in cycle_dataloader(loader) for row in rows)
    submitted = 0
    records: list[dict[str, Any]] = []
    t_train = time.perf_counter()
    try:
        for step in range(args.steps):
            t0 = time.perf_counter()
            if args.driver == "prepare_batch":
                batch = executor.prepare_batch(loader, workflow)
            else:
                # keep (K + 1) batches of prompts submitted ahead of the trainer; AReaL's
                # StalenessManager decides when each one starts
                while submitted < (step + 1 + args.offpolicyness) * args.prompts:
                    executor.submit(next(prompts), workflow)
                    submitted += 1
                batch = executor.wait(args.prompts)
            t1 = time.perf_counter()
            version = engine.get_version()
            rewards = torch.cat([t["rewards"].flatten() for t in batch])
            record: dict[str, Any] = {
                "step": step,
                "version": version,
                "n_seqs": int(rewards.numel()),
                "n_tokens": int(sum(int(t["loss_mask"].sum()) for t in batch)),
                "reward_mean": float(rewards.mean()),
                **measured_staleness(batch, version),
            }
            prox = actor.compute_logp(batch)
            for traj, lp in zip(batch, prox, strict=True):
                traj["prox_logp"] = lp
            batch = actor.compute_advantages(batch)
            record["ess_batch"] = batch_ess(batch)
            actor.ppo_update(batch)
            engine.step_lr_scheduler()
            # AReaL's order: pause rollouts, push weights, bump versions, export, resume
            executor.pause()
            engine.set_version(version + 1)
            sampler.update_weights(full_state_dict(engine.model), version + 1)
            stats = stats_tracker.export_all(reduce_group=engine.data_parallel_group)
            executor.resume()
            t2 = time.perf_counter()
            record["stats"] = {k: stats[k] for k in KEPT_STATS if k in stats}
            record.update(summarise(stats))
            record.update(
                rollout_wait_s=t1 - t0,
                train_s=t2 - t1,
                step_s=t2 - t0,
                elapsed_s=t2 - t_train,
                completions_sampled=sampler.completions,
            )
            records.append(record)
            print(progress(record), flush=True)
    finally:
        executor.destroy()
    result = {
        "loss": args.loss,
        "offpolicyness": args.offpolicyness,
        "seed": args.seed,
        "prompts_per_step": args.prompts,
        "group_size": group,
        "max_new_tokens": args.max_new_tokens,
        "lr": args.lr,
        "driver": args.driver,
        "model": model_info,
        "setup_s": setup_s,
        "train_s": time.perf_counter() - t_train,
        "completions_sampled": sampler.completions,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "argv": sys.argv[1:],
        "steps": records,
    }
    (out / f"async_{args.loss}.json").write_text(json.dumps(result, indent=1))
    engine.destroy()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The DataLoader's collate: the batch as the list of its rows (AReaL submits each)."""
    return rows


def progress(r: dict[str, Any]) -> str:
    """The step's progress line."""

    def f(x: float | None, spec: str) -> str:
        return "n/a" if x is None else format(x, spec)

    return (
        f"step {r['step']:3d} v{r['version']:<3d} reward {r['reward_mean']:.3f} "
        f"ESS {f(r['ess'], '.4f')} (batch {r['ess_batch']:.4f}) "
        f"staleness avg {r['staleness_avg']:.2f} max {r['staleness_max']} "
        f"(AReaL avg {f(r['tracker_staleness_avg'], '.2f')} "
        f"max {f(r['tracker_staleness_max'], '.0f')}) {r['step_s']:.2f} s"
    )


def summarise(stats: dict[str, float]) -> dict[str, Any]:
    """The step's headline numbers from AReaL's exported stats (``None`` where absent)."""

    def get(*keys: str) -> float | None:
        for key in keys:
            if key in stats and not math.isnan(stats[key]):
                return float(stats[key])
        return None

    vs = f"{UPDATE}version_stats/"
    return {
        "ess": get(f"{UPDATE}ess"),
        "ess_capped_frac": get(f"{UPDATE}ess_capped_frac"),
        "ess_kl_behavior": get(f"{UPDATE}ess_kl_behavior"),
        "tracker_staleness_avg": get(
            f"{vs}sample_staleness_theta/avg", f"{vs}sample_staleness_theta_avg"
        ),
        "tracker_staleness_max": get(
            f"{vs}sample_staleness_theta/max", f"{vs}sample_staleness_theta_max"
        ),
        "grad_norm": get(f"{UPDATE}grad_norm"),
    }


if __name__ == "__main__":
    sys.exit(main())
