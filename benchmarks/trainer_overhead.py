"""End-to-end step time of ESSGRPOTrainer versus TRL's GRPOTrainer (default loss).

Same tiny model (built in code, same seed), same synthetic data, same GRPOConfig; the only
difference is the trainer class. Each repetition trains both trainers from scratch for
``--steps`` optimizer steps, in alternating order (interleaved, so drift in machine load hits
both alike); the per-step wall time (generation + loss + backward + optimizer) is measured by a
callback, the first ``--warmup`` steps are dropped, and each run contributes its mean step
time (generation steps and reuse steps alike, as a user experiences them). Reported: the median over repetitions of the per-repetition ratio ESS / GRPO, and its
spread (min, max), with torch/trl/transformers versions, device and thread count.

    python benchmarks/trainer_overhead.py --output-dir outputs/bench
    python benchmarks/trainer_overhead.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output-dir", default="outputs/bench", help="JSON and Markdown go here")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repetitions per trainer")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="steps dropped at the start of each run")
    p.add_argument("--batch-size", type=int, default=64, help="completions per optimizer step")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--num-iterations", type=int, default=2, help="2: half the steps are off-policy")
    p.add_argument("--max-completion-length", type=int, default=6)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="3 repeats x 12 steps (smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.steps, args.warmup = 3, 12, 3
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    return args


def run_once(trainer_name: str, args: argparse.Namespace, workdir: Path) -> list[float]:
    """Train one fresh tiny model; return the wall time of each optimizer step (seconds)."""
    import torch
    from ess_po.integrations import tiny
    from ess_po.integrations.trl import ESSGRPOTrainer
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = tiny.build_tiny_tokenizer()
    model = tiny.build_tiny_model(tokenizer, hidden_size=args.hidden_size, seed=args.seed)
    config = GRPOConfig(
        output_dir=str(workdir / trainer_name),
        per_device_train_batch_size=args.batch_size,
        num_generations=args.num_generations,
        num_iterations=args.num_iterations,
        max_completion_length=args.max_completion_length,
        max_steps=args.steps,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
        disable_tqdm=True,
        log_level="error",
    )
    cls = {"ess": ESSGRPOTrainer, "grpo": GRPOTrainer}[trainer_name]
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.start)

    trainer = cls(
        model=model,
        reward_funcs=tiny.copy_reward,
        args=config,
        train_dataset=tiny.build_task_dataset(1000, seed=args.seed),
        processing_class=tokenizer,
        callbacks=[Timer()],
    )
    trainer.train()
    return times


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import torch
    import transformers
    import trl

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    runs: dict[str, list[float]] = {"ess": [], "grpo": []}
    ratios: list[float] = []
    scratch = tempfile.TemporaryDirectory(prefix="ess-po-overhead-")  # trainer output dirs
    for rep in range(args.repeats):
        order = ("ess", "grpo") if rep % 2 == 0 else ("grpo", "ess")
        medians = {}
        for name in order:
            times = run_once(name, args, Path(scratch.name))[args.warmup :]
            medians[name] = statistics.fmean(times)
            runs[name].append(medians[name])
        ratios.append(medians["ess"] / medians["grpo"])
        print(
            f"rep {rep + 1}/{args.repeats}: ess {medians['ess'] * 1e3:.1f} ms/step, "
            f"grpo {medians['grpo'] * 1e3:.1f} ms/step, ratio {ratios[-1]:.3f}",
            flush=True,
        )

    result = {
        "ratio_ess_over_grpo": {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
            "per_repeat": ratios,
        },
        "step_time_ms": {
            name: {
                "median": statistics.median(v) * 1e3,
                "min": min(v) * 1e3,
                "max": max(v) * 1e3,
            }
            for name, v in runs.items()
        },
        "settings": {k: v for k, v in vars(args).items() if k != "output_dir"},
        "environment": {
            "torch": torch.__version__,
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": "python " + " ".join(sys.argv),
        },
    }
    (out / "trainer_overhead.json").write_text(json.dumps(result, indent=2))
    (out / "trainer_overhead.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    r, s, e = result["ratio_ess_over_grpo"], result["settings"], result["environment"]
    lines = [
        "# ESSGRPOTrainer vs GRPOTrainer: end-to-end step time",
        "",
        f"Tiny Qwen2 (hidden {s['hidden_size']}), {s['batch_size']} completions/step, "
        f"num_iterations={s['num_iterations']}, {s['steps']} steps/run ({s['warmup']} warm-up dropped), "
        f"{s['repeats']} interleaved repeats. torch {e['torch']}, trl {e['trl']}, "
        f"transformers {e['transformers']}, {e['device']} ({e['cpu']}), {e['torch_threads']} thread(s); "
        f"{e.get('date', '')}: `{e.get('command', '')}`.",
        "",
        "| trainer | step time (ms), median over repeats | min | max |",
        "|---|---|---|---|",
    ]
    for name, label in (("grpo", "GRPOTrainer (dapo)"), ("ess", "ESSGRPOTrainer")):
        t = result["step_time_ms"][name]
        lines.append(f"| {label} | {t['median']:.1f} | {t['min']:.1f} | {t['max']:.1f} |")
    lines += [
        "",
        f"**Ratio ESS / GRPO (median of per-repeat ratios): {r['median']:.3f}** "
        f"(min {r['min']:.3f}, max {r['max']:.3f}).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
