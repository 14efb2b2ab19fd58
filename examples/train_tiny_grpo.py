"""Train a tiny causal LM with ESSGRPOTrainer on a verifiable task, offline, on CPU.

    python examples/train_tiny_grpo.py --output-dir outputs/tiny_grpo

Builds a 2-layer Qwen2-style model (hidden 64) and a character tokenizer in code, gives it a
short supervised warm start, then trains it with ESSGRPOTrainer (num_iterations=2, so every
generation batch is reused once and ESS < 1 on the reuse) on pattern completion ("cab=" ->
"cde"). Prints reward and ESS as it trains and writes into --output-dir:

    metrics.jsonl   one JSON object per logging step (TRL's logs, incl. ess/*)
    reward_ess.png  reward and ESS versus step
    summary.json    start/end reward, ESS range, settings

The same script runs a real model and dataset where they exist (needs network or a local copy):

    python examples/train_tiny_grpo.py --model Qwen/Qwen2.5-0.5B-Instruct \
        --dataset my/dataset --answer-column answer --warm-start-steps 0

The dataset needs a "prompt" column and an answer column; the reward is the fraction of the
answer's characters reproduced (``ess_po.integrations.tiny.copy_reward``). Pass
``--trainer grpo`` to run TRL's GRPOTrainer with the same settings for comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output-dir", default="outputs/tiny_grpo", help="where metrics and plot go")
    p.add_argument(
        "--model", default=None, help="model path or hub name (default: tiny, built in code)"
    )
    p.add_argument("--dataset", default=None, help="dataset path or hub name (default: synthetic)")
    p.add_argument("--dataset-split", default="train")
    p.add_argument("--answer-column", default="answer")
    p.add_argument(
        "--task", default="successor", choices=["successor", "copy"], help="synthetic task"
    )
    p.add_argument("--trainer", default="ess", choices=["ess", "grpo"], help="objective")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument(
        "--warm-start-steps",
        type=int,
        default=None,
        help="SFT steps before RL (default 15 tiny, 0 real)",
    )
    p.add_argument("--learning-rate", type=float, default=5e-3)
    p.add_argument("--batch-size", type=int, default=64, help="completions per optimizer step")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument(
        "--num-iterations", type=int, default=2, help="passes over each generation batch"
    )
    p.add_argument(
        "--steps-per-generation", type=int, default=2, help="optimizer steps per generation pass"
    )
    p.add_argument("--max-completion-length", type=int, default=6)
    p.add_argument("--beta", type=float, default=0.0, help="KL-to-reference coefficient")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(model, tokenizer, dataset) from --model/--dataset or the built-in tiny ones."""
    from ess_po.integrations import tiny

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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import torch
    from ess_po.integrations.tiny import copy_reward, warm_start
    from ess_po.integrations.trl import ESSGRPOTrainer
    from transformers import ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, dataset = build(args)
    warm = (
        args.warm_start_steps
        if args.warm_start_steps is not None
        else (15 if args.model is None else 0)
    )
    if warm:
        losses = warm_start(model, tokenizer, dataset, steps=warm, seed=args.seed)
        print(f"warm start: {warm} SFT steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    config = GRPOConfig(
        output_dir=str(out / "trainer"),
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
    trainer_cls = ESSGRPOTrainer if args.trainer == "ess" else GRPOTrainer
    trainer = trainer_cls(
        model=model,
        reward_funcs=copy_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )

    records: list[dict[str, Any]] = []
    jsonl = (out / "metrics.jsonl").open("w")

    class Report(ProgressCallback):
        """TRL's progress bar, with one compact line per step instead of the full log dict."""

        def on_log(self, _args, state, control, logs=None, **kwargs):
            if (
                not state.is_world_process_zero
                or not logs
                or ("reward" not in logs and "ess/mean" not in logs)
            ):
                return
            row = {"step": state.global_step, **logs}
            records.append(row)
            jsonl.write(json.dumps(row) + "\n")
            jsonl.flush()
            line = f"step {state.global_step:4d}"
            if "reward" in logs:
                line += f"  reward {logs['reward']:.3f}"
            if "ess/mean" in logs:
                line += f"  ess {logs['ess/mean']:.3f}  capped {logs['ess/capped_frac']:.3f}"
            if self.training_bar is not None and state.global_step % 5 == 0:
                self.training_bar.write(line)

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(Report())
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    jsonl.close()

    summary = summarize(records, args, elapsed)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(
        records,
        out / "reward_ess.png",
        title=f"{trainer_cls.__name__} on {args.task if args.dataset is None else args.dataset}",
    )
    print(json.dumps(summary, indent=2))
    return summary


def _window_mean(values: list[float], k: int) -> float:
    values = values[:k] if k > 0 else values[k:]
    return sum(values) / max(len(values), 1)


def summarize(
    records: list[dict[str, Any]], args: argparse.Namespace, elapsed: float
) -> dict[str, Any]:
    rewards = [r["reward"] for r in records if r.get("reward") is not None]
    ess = [r["ess/mean"] for r in records if r.get("ess/mean") is not None]
    window = max(1, min(10, len(rewards) // 4))
    return {
        "trainer": args.trainer,
        "steps": args.steps,
        "num_iterations": args.num_iterations,
        "learning_rate": args.learning_rate,
        "seconds": round(elapsed, 1),
        "reward_first_steps": round(_window_mean(rewards, window), 4),
        "reward_last_steps": round(_window_mean(rewards, -window), 4),
        "reward_window": window,
        "ess_min": round(min(ess), 4) if ess else None,
        "ess_max": round(max(ess), 4) if ess else None,
        "ess_mean": round(sum(ess) / len(ess), 4) if ess else None,
    }


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records if r.get("reward") is not None]
    rewards = [r["reward"] for r in records if r.get("reward") is not None]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    ax1.plot(steps, rewards, ".", alpha=0.4, label="reward (per generation batch)")
    k = 5
    if len(rewards) >= k:
        smooth = [sum(rewards[i - k + 1 : i + 1]) / k for i in range(k - 1, len(rewards))]
        ax1.plot(steps[k - 1 :], smooth, "-", label=f"{k}-batch moving mean")
    ax1.set_ylabel("reward")
    ax1.set_ylim(0, 1)
    ax1.legend(loc="lower right")
    ax1.set_title(title)
    ess = [
        (r["step"], r["ess/mean"], r["ess/capped_frac"])
        for r in records
        if r.get("ess/mean") is not None
    ]
    if ess:
        s, e, c = zip(*ess, strict=True)
        ax2.plot(s, e, ".-", label="ESS")
        ax2.plot(s, c, ".", alpha=0.5, label="capped fraction")
        ax2.set_ylim(0, 1.05)
        ax2.legend(loc="lower left")
    ax2.set_ylabel("ESS")
    ax2.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    if not all(math.isfinite(v) for v in rewards):
        raise RuntimeError("non-finite reward in the log")


if __name__ == "__main__":
    main()
