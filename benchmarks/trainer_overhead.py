"""End-to-end step time of ESSGRPOTrainer versus TRL's GRPOTrainer (default loss).

Same tiny model (built in code, same seed), same synthetic data, same GRPOConfig; the only
difference is the trainer class. Each repetition trains both trainers from scratch for
``--steps`` optimizer steps, in alternating order (interleaved, so drift in machine load hits
both alike); the per-step wall time (generation + loss + backward + optimizer) is measured by a
callback, the first ``--warmup`` steps are dropped, and each run contributes its mean step
time (generation steps and reuse steps alike, as a user experiences them). Reported: the median over repetitions of the per-repetition ratio ESS / GRPO, and its
spread (min, max), with torch/trl/transformers versions, device and thread count.

``ess`` is ``ESSGRPOTrainer`` with ``ess_scope="call"`` (one ESS per loss call);
``--trainers ess,ess-step,grpo`` adds ``ess_scope="step"`` (one ESS per optimizer step, the
default) and splits step times by kind: *generation* steps (the first optimizer step after
a generation, where the step statistics come free from TRL's recomputed log-probs) and *reuse*
steps (later iterations over the batch, where they cost one no-grad forward per micro-batch).

    python benchmarks/trainer_overhead.py --output-dir outputs/bench
    python benchmarks/trainer_overhead.py --quick
    python benchmarks/trainer_overhead.py --trainers ess,ess-step,grpo --output-stem step_window
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
    p.add_argument(
        "--trainers",
        default="ess,grpo",
        help="comma-separated: ess, ess-step, grpo (first: baseline)",
    )
    p.add_argument("--output-stem", default="trainer_overhead", help="file name of JSON/Markdown")
    args = p.parse_args(argv)
    args.trainers = args.trainers.split(",")
    unknown = set(args.trainers) - set(TRAINERS)
    if unknown or "grpo" not in args.trainers:
        p.error(f"--trainers takes {sorted(TRAINERS)} and must include grpo, got {args.trainers}")
    if args.quick:
        args.repeats, args.steps, args.warmup = 3, 12, 3
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    return args


TRAINERS = {
    "ess": 'ESSGRPOTrainer, ess_scope="call"',
    "ess-step": 'ESSGRPOTrainer, ess_scope="step"',
    "grpo": "GRPOTrainer (dapo)",
}


def run_once(trainer_name: str, args: argparse.Namespace, workdir: Path) -> list[tuple[int, float]]:
    """Train one fresh tiny model; return (global step, wall seconds) of each optimizer step."""
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from ess_po.integrations.trl import ESSGRPOConfig, ESSGRPOTrainer
    from ess_po.testing import tiny

    tokenizer = tiny.build_tiny_tokenizer()
    model = tiny.build_tiny_model(tokenizer, hidden_size=args.hidden_size, seed=args.seed)
    # Both scopes explicit, so the figures do not move when the default does.
    extra = {"ess": {"ess_scope": "call"}, "ess-step": {"ess_scope": "step"}}.get(trainer_name, {})
    config = (ESSGRPOConfig if trainer_name != "grpo" else GRPOConfig)(
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
        **extra,
    )
    cls = GRPOTrainer if trainer_name == "grpo" else ESSGRPOTrainer
    times: list[tuple[int, float]] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **__):
            self.step, self.start = state.global_step, time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append((self.step, time.perf_counter() - self.start))

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

    names = args.trainers
    # mean step time per repetition: all steps, generation steps, reuse steps
    runs: dict[str, dict[str, list[float]]] = {n: {k: [] for k in KINDS} for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names if n != "grpo"}
    scratch = tempfile.TemporaryDirectory(prefix="ess-po-overhead-")  # trainer output dirs
    for rep in range(args.repeats):
        order = names if rep % 2 == 0 else names[::-1]  # interleaved
        means = {}
        for name in order:
            timed = run_once(name, args, Path(scratch.name))[args.warmup :]
            kinds = {
                "all": [t for _, t in timed],
                "generation": [t for k, t in timed if k % args.num_iterations == 0],
                "reuse": [t for k, t in timed if k % args.num_iterations != 0],
            }
            for kind, values in kinds.items():
                if values:
                    runs[name][kind].append(statistics.fmean(values))
            means[name] = statistics.fmean(kinds["all"])
        for name in ratios:
            ratios[name].append(means[name] / means["grpo"])
        print(
            f"rep {rep + 1}/{args.repeats}: "
            + ", ".join(f"{n} {means[n] * 1e3:.1f} ms/step" for n in names),
            flush=True,
        )

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    result = {
        "ratio_over_grpo": {
            name: {
                "median": statistics.median(v),
                "min": min(v),
                "max": max(v),
                "per_repeat": v,
            }
            for name, v in ratios.items()
        },
        "step_time_ms": {
            name: {
                kind: {
                    "median": statistics.median(v) * 1e3,
                    "min": min(v) * 1e3,
                    "max": max(v) * 1e3,
                }
                for kind, v in by_kind.items()
                if v
            }
            for name, by_kind in runs.items()
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
            "load_average_at_end": load,
        },
    }
    (out / f"{args.output_stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{args.output_stem}.md").write_text(markdown(result))
    print(markdown(result))
    return result


KINDS = ("all", "generation", "reuse")


def markdown(result: dict[str, Any]) -> str:
    s, e = result["settings"], result["environment"]
    lines = [
        "# ESSGRPOTrainer vs GRPOTrainer: end-to-end step time",
        "",
        f"Tiny Qwen2 (hidden {s['hidden_size']}), {s['batch_size']} completions/step, "
        f"num_iterations={s['num_iterations']}, {s['steps']} steps/run ({s['warmup']} warm-up dropped), "
        f"{s['repeats']} interleaved repeats. torch {e['torch']}, trl {e['trl']}, "
        f"transformers {e['transformers']}, {e['device']} ({e['cpu']}), {e['torch_threads']} thread(s); "
        f"{e.get('date', '')}: `{e.get('command', '')}`"
        + (
            f"; load average at the end {e['load_average_at_end'][0]:.1f}."
            if e.get("load_average_at_end")
            else "."
        ),
        "",
        "Step time (ms), median over repeats [min, max]; *generation*: the first optimizer step after "
        "a generation; *reuse*: the later iterations over the same batch.",
        "",
        "| trainer | all steps | generation steps | reuse steps |",
        "|---|---|---|---|",
    ]
    labels = {**TRAINERS}
    for name in [n for n in ("grpo", "ess", "ess-step") if n in result["step_time_ms"]]:
        t = result["step_time_ms"][name]
        cells = [
            f"{t[k]['median']:.1f} [{t[k]['min']:.1f}, {t[k]['max']:.1f}]" if k in t else "-"
            for k in KINDS
        ]
        lines.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
    lines.append("")
    for name, r in result["ratio_over_grpo"].items():
        lines.append(
            f"**{labels[name]} / GRPOTrainer (median of per-repeat ratios, all steps): "
            f"{r['median']:.3f}** (min {r['min']:.3f}, max {r['max']:.3f})."
        )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
