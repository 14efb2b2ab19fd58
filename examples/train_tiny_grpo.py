"""Train a tiny causal LM with ESSGRPOTrainer on a verifiable task, offline, on CPU.

Run it from the root of a checkout:

    python examples/train_tiny_grpo.py --output-dir outputs/tiny_grpo
    python examples/train_tiny_grpo.py --trainer both   # and TRL's GRPOTrainer as a baseline

Needs the `demo` extra (TRL and matplotlib): `pip install -e ".[demo]"`.

It builds a 2-layer Qwen2-style model (hidden 64) and a character tokenizer in code, gives the
model a short supervised warm start, then trains it with ESSGRPOTrainer on pattern completion
("cab=" -> "cde", reward = fraction of characters right). Each generation batch serves
num_iterations x steps_per_generation optimizer steps (2 x 2 by default): the first pass over it
is "fresh", the second "reuse". Its lag is the number of optimizer updates since it was sampled;
at lag 0 the batch is on-policy (ESS = 1), later the policy has moved and ESS < 1.

Console: one line per optimizer step with the reward (running mean over the last generation
batches), fresh or reuse, the lag, and ESS where it is below 1. The other diagnostics (capped
fraction, behaviour KL, ratio range) go to metrics.jsonl; docs/metrics.md says how to read them.

Written to --output-dir:

    metrics.jsonl        one JSON object per optimizer step (TRL's logs, incl. ess/*)
    metrics_grpo.jsonl   the same for the GRPOTrainer baseline (--trainer both)
    reward_ess.png       reward (top) and ESS of the off-policy steps (bottom) versus step
    summary.json         start/end reward, ESS range, settings

A real model and dataset (needs network or a local copy; the dataset needs a "prompt" column
and an answer column, and the reward is ess_po.testing.tiny.copy_reward):

    python examples/train_tiny_grpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset my/dataset --answer-column answer --warm-start-steps 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

REWARD_WINDOW = 5  # generation batches in the console's running mean of the reward
ESS_WINDOW = 10  # steps in the plot's running mean of ESS


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in --help, and the module docstring's layout kept."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--output-dir", default="outputs/tiny_grpo", help="where metrics and plot go")
    p.add_argument(
        "--model", default=None, help="model path or hub name (None: the tiny model, built in code)"
    )
    p.add_argument(
        "--dataset", default=None, help="dataset path or hub name (None: the synthetic --task)"
    )
    p.add_argument("--dataset-split", default="train", help="split of --dataset")
    p.add_argument("--answer-column", default="answer", help="answer column of --dataset")
    p.add_argument(
        "--task", default="successor", choices=["successor", "copy"], help="synthetic task"
    )
    p.add_argument(
        "--trainer",
        default="ess",
        choices=["ess", "grpo", "both"],
        help="ESSGRPOTrainer, TRL's GRPOTrainer, or both (GRPOTrainer overlaid as a baseline)",
    )
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument(
        "--warm-start-steps",
        type=int,
        default=None,
        help="SFT steps before RL (None: 15 for the tiny model, 0 for --model)",
    )
    p.add_argument("--learning-rate", type=float, default=5e-3, help="constant learning rate")
    p.add_argument("--batch-size", type=int, default=64, help="completions per optimizer step")
    p.add_argument("--num-generations", type=int, default=8, help="completions per prompt")
    p.add_argument(
        "--num-iterations", type=int, default=2, help="passes over each generation batch"
    )
    p.add_argument(
        "--steps-per-generation", type=int, default=2, help="optimizer steps per generation pass"
    )
    p.add_argument("--max-completion-length", type=int, default=6, help="tokens")
    p.add_argument("--beta", type=float, default=0.0, help="KL-to-reference coefficient")
    p.add_argument("--seed", type=int, default=0, help="model init, data and sampling seed")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(model, tokenizer, dataset) from --model/--dataset or the built-in tiny ones."""
    from ess_po.testing import tiny

    if args.model is None:
        tokenizer = tiny.build_tiny_tokenizer()
        model = tiny.build_tiny_model(tokenizer, seed=args.seed)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(args.model)
    if args.dataset is None:
        dataset = tiny.build_task_dataset(2000, task=args.task, seed=args.seed)
    else:
        from datasets import load_dataset

        dataset = load_dataset(args.dataset, split=args.dataset_split)
        if args.answer_column != "answer":
            dataset = dataset.rename_column(args.answer_column, "answer")
    return model, tokenizer, dataset


def step_phase(step: int, args: argparse.Namespace) -> tuple[str, int]:
    """("fresh" | "reuse", lag) of optimizer step ``step`` (1-based).

    TRL generates a batch every ``steps_per_generation * num_iterations`` steps and walks it
    ``num_iterations`` times, ``steps_per_generation`` slices per pass; the lag is the number of
    optimizer updates since the batch was sampled.
    """
    lag = (step - 1) % (args.steps_per_generation * args.num_iterations)
    return ("fresh" if lag < args.steps_per_generation else "reuse"), lag


def running_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean of the last ``window`` values at each position."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def train(args: argparse.Namespace, kind: str, out: Path) -> tuple[list[dict[str, Any]], float]:
    """Train one fresh model with ``kind`` ("ess" or "grpo"); return the logged rows and seconds."""
    import torch
    from transformers import ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    from ess_po.integrations.trl import ESSGRPOTrainer
    from ess_po.testing.tiny import copy_reward, warm_start

    model, tokenizer, dataset = build(args)
    warm = args.warm_start_steps
    if warm is None:
        warm = 15 if args.model is None else 0
    if warm:
        losses = warm_start(model, tokenizer, dataset, steps=warm, seed=args.seed)
        print(f"warm start: {warm} SFT steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    config = GRPOConfig(
        output_dir=str(out / f"trainer_{kind}"),
        per_device_train_batch_size=args.batch_size,
        num_generations=args.num_generations,
        num_iterations=args.num_iterations,
        steps_per_generation=args.steps_per_generation,
        max_completion_length=args.max_completion_length,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        beta=args.beta,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
    )
    trainer_cls = ESSGRPOTrainer if kind == "ess" else GRPOTrainer
    trainer = trainer_cls(
        model=model,
        reward_funcs=copy_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    records: list[dict[str, Any]] = []
    rewards: list[float] = []  # one per generation batch
    jsonl = (out / ("metrics.jsonl" if kind == "ess" else f"metrics_{kind}.jsonl")).open("w")

    class Report(ProgressCallback):
        """TRL's progress bar, with one compact line per optimizer step instead of the log dict."""

        def on_log(self, _args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return  # the end-of-training summary has no "loss"
            step = state.global_step
            phase, lag = step_phase(step, args)
            row = {"step": step, "phase": phase, "lag": lag, **logs}
            records.append(row)
            jsonl.write(json.dumps(row) + "\n")
            jsonl.flush()
            if logs.get("reward") is not None:  # logged on the steps that generate
                rewards.append(logs["reward"])
            line = f"{kind:4s} step {step:4d}  {phase} (lag {lag})"
            if rewards:
                recent = rewards[-REWARD_WINDOW:]
                line += f"  reward {sum(recent) / len(recent):.3f}"
            ess = logs.get("ess/mean")
            if ess is not None and ess < 1 - 5e-4:
                line += f"  ESS {ess:.3f}"
            if self.training_bar is not None:
                self.training_bar.write(line)

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(Report())
    cycle = args.steps_per_generation * args.num_iterations
    print(
        f"{trainer_cls.__name__}: each generation batch serves {cycle} optimizer steps "
        f"({args.num_iterations} passes x {args.steps_per_generation} steps).\n"
        f"  reward: running mean over the last {REWARD_WINDOW} generation batches; "
        "lag: optimizer updates since the batch was sampled"
    )
    if kind == "ess":
        print(
            "  ESS: shown where below 1. Capped fraction, behaviour KL, ratio range: in "
            "metrics.jsonl; how to read them: docs/metrics.md"
        )
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    jsonl.close()
    return records, elapsed


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    kinds = ["ess", "grpo"] if args.trainer == "both" else [args.trainer]
    runs = {kind: train(args, kind, out) for kind in kinds}

    main_kind = kinds[0]
    summary = summarize(*runs[main_kind], args, main_kind)
    if args.trainer == "both":
        summary["baseline"] = summarize(*runs["grpo"], args, "grpo")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    task = args.task if args.dataset is None else args.dataset
    plot(
        {kind: records for kind, (records, _) in runs.items()},
        out / "reward_ess.png",
        title=f"tiny Qwen2 on {task}, {args.num_iterations} passes x "
        f"{args.steps_per_generation} steps per generation batch",
    )
    print(json.dumps(summary, indent=2))
    print(f"plot: {out / 'reward_ess.png'}   how to read the ess/* metrics: docs/metrics.md")
    print(story(summary, args))
    return summary


SEEDS_FILE = Path(__file__).resolve().parents[1] / "docs" / "results" / "demo" / "seeds.json"


def story(summary: dict[str, Any], args: argparse.Namespace) -> str:
    """What this run shows, in words, from its own numbers (and, with --trainer both, from the
    committed three-seed runs of the same command)."""
    first = summary["reward_first_steps"]
    last = summary["reward_last_steps"]
    name = "ESSGRPOTrainer" if summary["trainer"] == "ess" else "GRPOTrainer"
    lines = [
        "",
        "What you are looking at:",
        f"- {name}: reward {first:.2f} over the first {summary['reward_window']} steps, "
        f"{last:.2f} over the last {summary['reward_window']}.",
    ]
    if summary.get("ess_mean") is not None:
        lines.append(
            f"- ESS is 1 on fresh lag-0 steps; over all steps it averaged "
            f"{summary['ess_mean']:.2f} (lowest {summary['ess_min']:.2f}). Below 1 the policy "
            "term's weights are capped at ESS and the (1 - ESS) regulariser pulls toward the "
            "policy that sampled the batch."
        )
    base = summary.get("baseline")
    if base is not None:
        gap = last - base["reward_last_steps"]
        lines.append(
            f"- GRPOTrainer (clipped, same settings): {base['reward_last_steps']:.2f} over the "
            f"last {base['reward_window']} steps; ESS minus GRPO = {gap:+.2f}. This is one seed."
        )
        lines += _seed_note(args)
    lines.append(
        "- Which objective for stale or asynchronous data, measured: docs/guides/stale.md."
    )
    return "\n".join(lines)


def _seed_note(args: argparse.Namespace) -> list[str]:
    """The committed three-seed runs of the default demo, when this run used its settings."""
    if not SEEDS_FILE.exists():
        return []
    seeds = json.loads(SEEDS_FILE.read_text())
    settings = seeds["settings"]
    same = (
        args.model is None
        and args.dataset is None
        and args.steps == settings["steps"]
        and args.num_iterations == settings["num_iterations"]
        and args.steps_per_generation == settings["steps_per_generation"]
        and args.learning_rate == settings["learning_rate"]
    )
    if not same:
        return []
    pairs = ", ".join(
        f"seed {r['seed']}: {r['ess_reward_last_steps']:.2f} vs {r['grpo_reward_last_steps']:.2f}"
        for r in seeds["runs"]
    )
    return [
        f"- The same command over three seeds (docs/results/demo/seeds.md), ESS vs GRPO: "
        f"{pairs}. The trainer ahead changes with the seed: one run of each decides nothing."
    ]


def _window_mean(values: list[float], k: int) -> float:
    values = values[:k] if k > 0 else values[k:]
    return sum(values) / max(len(values), 1)


def summarize(
    records: list[dict[str, Any]], elapsed: float, args: argparse.Namespace, kind: str
) -> dict[str, Any]:
    rewards = [r["reward"] for r in records if r.get("reward") is not None]
    ess = [r["ess/mean"] for r in records if r.get("ess/mean") is not None]
    window = max(1, min(10, len(rewards) // 4))
    return {
        "trainer": kind,
        "steps": args.steps,
        "num_iterations": args.num_iterations,
        "steps_per_generation": args.steps_per_generation,
        "learning_rate": args.learning_rate,
        "seconds": round(elapsed, 1),
        "reward_first_steps": round(_window_mean(rewards, window), 4),
        "reward_last_steps": round(_window_mean(rewards, -window), 4),
        "reward_window": window,
        "ess_min": round(min(ess), 4) if ess else None,
        "ess_max": round(max(ess), 4) if ess else None,
        "ess_mean": round(sum(ess) / len(ess), 4) if ess else None,
    }


def plot(runs: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    """Reward per generation batch (top) and ESS of the off-policy steps (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"ess": "ESSGRPOTrainer", "grpo": "GRPOTrainer (clipped, baseline)"}
    colors = {"ess": "tab:blue", "grpo": "tab:gray"}
    fig, (ax1, ax2) = plt.subplots(
        2, 1, figsize=(8, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    for kind, records in runs.items():
        rows = [r for r in records if r.get("reward") is not None]
        steps, rewards = [r["step"] for r in rows], [r["reward"] for r in rows]
        if not all(math.isfinite(v) for v in rewards):
            raise RuntimeError(f"non-finite reward in the {kind} log")
        ax1.plot(steps, rewards, ".", color=colors[kind], alpha=0.3, ms=4)
        ax1.plot(
            steps,
            running_mean(rewards, REWARD_WINDOW),
            "-",
            color=colors[kind],
            label=f"{names[kind]}: running mean of {REWARD_WINDOW} batches",
        )
    ax1.set_ylabel("reward (per generation batch)")
    ax1.set_ylim(0, 1)
    ax1.grid(alpha=0.3)
    ax1.legend(loc="lower right", fontsize=8)
    ax1.set_title(title, fontsize=10)

    records = runs.get("ess", [])
    groups = [("fresh", "fresh pass, lag >= 1", "tab:blue"), ("reuse", "reuse pass", "tab:red")]
    for phase, label, color in groups:
        rows = [r for r in records if r.get("phase") == phase and r["lag"] > 0 and "ess/mean" in r]
        if not rows:
            continue
        steps, ess = [r["step"] for r in rows], [r["ess/mean"] for r in rows]
        ax2.plot(steps, ess, ".", color=color, alpha=0.3, ms=4)
        ax2.plot(
            steps,
            running_mean(ess, ESS_WINDOW),
            "-",
            color=color,
            label=f"{label}: running mean of {ESS_WINDOW} steps",
        )
    if records:
        lowest = min([0.9] + [r["ess/mean"] for r in records if "ess/mean" in r])
        ax2.set_ylim(lowest - 0.02, 1.005)
        ax2.legend(
            loc="lower right",
            fontsize=8,
            title="lag 0 steps: ESS = 1 (not shown)",
            title_fontsize=8,
        )
    else:
        ax2.text(0.5, 0.5, "GRPOTrainer logs no ESS", ha="center", transform=ax2.transAxes)
    ax2.set_ylabel("ESS")
    ax2.set_xlabel("optimizer step")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
