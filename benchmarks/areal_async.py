"""Asynchronous training in AReaL 1.0.4 at staleness up to 4: the ESS objective against AReaL's
own decoupled PPO loss.

Each run is ``ess_po.testing.areal_async`` (one gloo rank under torchrun): AReaL's
``WorkflowExecutor`` with ``max_head_offpolicyness=4`` and its ``StalenessManager``, a stand-in
inference engine sampling from the trainer's pushed weights, AReaL's FSDP2 actor engine on CPU
training with ``ESSFSDPPPOActor`` ("ess") or with AReaL's ``PPOActor`` ("grpo": decoupled PPO,
``eps_clip=0.2``, behaviour-ratio cap 5). Same task (``successor``), tiny Qwen2, warm start,
learning rate and seeds for both losses. Per step it records the batch's reward, the staleness
of its tokens, the ESS of its behaviour weights (sampler against the recomputed proximal
log-probs; for "ess" that is the ESS the loss used), grad norm and timings.

Benchmarks measure, never assert. Writes ``async.json`` (every step of every run, versions,
date, command, machine), ``async.md`` and ``async.png`` to ``--out``. Needs the AReaL
environment (``.ci/areal.sh``) for the runs; it has no matplotlib, so draw the figure afterwards
from the JSON with the main environment::

    .venv-areal/bin/python benchmarks/areal_async.py --out docs/results/areal
    .venv/bin/python benchmarks/areal_async.py --out docs/results/areal --replot
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LOSS_NAMES = {"ess": "ESS (ESSFSDPPPOActor)", "grpo": "AReaL decoupled PPO (PPOActor)"}
EDGE = 5  # steps averaged for the start and end rewards


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="outputs/areal_async", help="JSON, Markdown and PNG go here")
    p.add_argument("--steps", type=int, default=80, help="optimizer steps per run")
    p.add_argument("--offpolicyness", type=int, default=4, help="max_head_offpolicyness")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--losses", nargs="+", choices=list(LOSS_NAMES), default=list(LOSS_NAMES))
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument(
        "--parts",
        nargs="+",
        choices=["main", "sensitivity"],
        default=["main", "sensitivity"],
        help="run only these parts; the others are kept from the JSON in --out",
    )
    p.add_argument("--sensitivity-lr", type=float, default=1e-3)
    p.add_argument("--sensitivity-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--replot", action="store_true", help="redraw Markdown and PNG from the JSON")
    p.add_argument("--quick", action="store_true", help="one seed, 8 steps (smoke)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.parts = 8, args.seeds[:1], ["main"]
    return args


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    return {n: md.version(n) for n in ("areal", "torch", "transformers", "ess-po")}


def measure(args: argparse.Namespace, previous: dict[str, Any] | None) -> dict[str, Any]:
    """Run the parts named by ``--parts``; the others are kept from ``previous`` (the JSON
    already in ``--out``).

    * ``main``: every loss and seed at ``--offpolicyness`` and ``--lr``.
    * ``sensitivity``: for ``--sensitivity-seeds``, both losses at ``--offpolicyness`` with
      ``--sensitivity-lr``, and both on-policy (``max_head_offpolicyness=0``) at ``--lr``: is a
      gap at ``--lr`` due to the staleness or to the step size?
    """
    from ess_po.testing.areal_async import run_async  # the run, shared with the tests

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    plan: dict[str, list[tuple[str, int, int, float]]] = {
        "main": [
            (loss, seed, args.offpolicyness, args.lr) for seed in args.seeds for loss in args.losses
        ],
        "sensitivity": [
            (loss, seed, k, lr)
            for seed in args.sensitivity_seeds
            for k, lr in ((args.offpolicyness, args.sensitivity_lr), (0, args.lr))
            for loss in args.losses
        ],
    }
    result: dict[str, Any] = {
        "benchmark": "areal_async",
        "date": now,
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "versions": _versions(),
        "settings": {
            "steps": args.steps,
            "offpolicyness": args.offpolicyness,
            "seeds": args.seeds,
            "prompts_per_step": args.prompts,
            "group_size": args.group_size,
            "lr": args.lr,
            "sensitivity_lr": args.sensitivity_lr,
            "sensitivity_seeds": args.sensitivity_seeds,
        },
        "parts": {},
    }
    if previous is not None and set(args.parts) != set(plan):
        shared = ("steps", "offpolicyness", "prompts_per_step", "group_size", "lr")
        differ = [k for k in shared if previous["settings"].get(k) != result["settings"][k]]
        if differ:
            raise SystemExit(f"kept parts were run with other settings ({differ}): rerun all")
    with tempfile.TemporaryDirectory(prefix="areal_async_") as tmp:
        for part, runs in plan.items():
            key = "runs" if part == "main" else part
            if part not in args.parts:
                if previous is None or key not in previous:
                    continue  # not run, none kept
                result[key] = previous[key]
                result["parts"][part] = previous.get("parts", {}).get(
                    part, {"date": previous["date"], "command": previous["command"]}
                )
                continue
            result[key] = []
            for loss, seed, k, lr in runs:
                t0 = time.perf_counter()
                run = run_async(
                    Path(tmp) / f"{part}_{loss}_k{k}_lr{lr:g}_seed{seed}",
                    args.steps,
                    k,
                    loss,
                    timeout=args.timeout,
                    seed=seed,
                    prompts=args.prompts,
                    group_size=args.group_size,
                    lr=lr,
                )
                run["wall_s"] = time.perf_counter() - t0
                run["argv"] = [a.replace(tmp, "<tmp>") for a in run.get("argv", [])]
                result[key].append(run)
                print(f"{part}: {loss} K={k} lr={lr:g} seed {seed}: {summary(run)}", flush=True)
            result["parts"][part] = {"date": now, "command": command}
    return result


def summary(run: dict[str, Any]) -> dict[str, float]:
    steps = run["steps"]
    n = min(EDGE, len(steps))
    return {
        "reward_start": statistics.fmean(s["reward_mean"] for s in steps[:n]),
        "reward_end": statistics.fmean(s["reward_mean"] for s in steps[-n:]),
        "staleness": statistics.fmean(s["staleness_avg"] for s in steps),
        "staleness_max": max(s["staleness_max"] for s in steps),
        "ess_batch": statistics.fmean(s["ess_batch"] for s in steps),
        "train_s": run["train_s"],
        "wall_s": run.get("wall_s", float("nan")),
    }


def _mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def markdown(result: dict[str, Any]) -> str:
    cfg = result["settings"]
    by_loss: dict[str, list[dict[str, float]]] = {}
    for run in result["runs"]:
        by_loss.setdefault(run["loss"], []).append(summary(run))
    run0 = result["runs"][0]
    lines = [
        "# Asynchronous training in AReaL: ESS against AReaL's decoupled PPO",
        "",
        f"Date {result['date']}; {result['machine']}; versions {result['versions']}.",
        *[
            f"Part {part}: `{info['command']}` ({info['date']})."
            for part, info in result.get("parts", {}).items()
        ],
        "",
        f"AReaL's `WorkflowExecutor` with `max_head_offpolicyness={cfg['offpolicyness']}` "
        f"({cfg['prompts_per_step']} prompts x {cfg['group_size']} completions a step, up to "
        f"{run0['max_new_tokens']} new tokens, temperature 1), a stand-in inference engine "
        "(a CPU copy of the policy, weights pushed after every step), AReaL's FSDP2 actor engine "
        f"on CPU (gloo, one rank, float32, one sequence per micro-batch). Task `successor`, tiny "
        f"Qwen2 warm-started {run0['model']['warm_start_steps']} supervised steps; Adam, lr "
        f"{cfg['lr']}, gradient clipping 1; rewards normalised per group, advantages over the "
        "batch (AReaL's gsm8k GRPO example); decoupled loss with recomputed proximal log-probs. "
        f"{cfg['steps']} steps, seeds {cfg['seeds']} for each loss. Made by "
        "`ess_po.testing.areal_async` (see its docstring for the two AReaL limitations the "
        "setup works around).",
        "",
        "A seed fixes a run (the sampler, the trainer, AReaL's batch shuffle; a 12-step run "
        "repeated exactly, checked once). "
        "The reward of step k is that of completions sampled by the policy of step k minus their "
        "staleness (4 once the rollouts have run ahead). ESS here is that of the behaviour "
        "weights `exp(logp_prox - logp_sampler)` over the batch's completion tokens (for the ESS "
        "loss, the ESS it trained with); mean ± sd over seeds.",
        "",
        "| loss | runs | reward, first 5 steps | reward, last 5 steps | change | mean staleness "
        "| max staleness | mean ESS | train s per run | wall s per run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for loss, rows in by_loss.items():
        change = [r["reward_end"] - r["reward_start"] for r in rows]
        lines.append(
            f"| {LOSS_NAMES.get(loss, loss)} | {len(rows)} "
            f"| {_mean_sd([r['reward_start'] for r in rows])} "
            f"| {_mean_sd([r['reward_end'] for r in rows])} | {_mean_sd(change)} "
            f"| {_mean_sd([r['staleness'] for r in rows])} "
            f"| {max(r['staleness_max'] for r in rows)} "
            f"| {_mean_sd([r['ess_batch'] for r in rows])} "
            f"| {statistics.fmean(r['train_s'] for r in rows):.0f} "
            f"| {statistics.fmean(r['wall_s'] for r in rows):.0f} |"
        )
    lines += ["", "Per run (train s: the steps; wall s: with start-up, warm start, engine build):"]
    lines += ["", "| loss | seed | reward start | reward end | mean ESS | train s | wall s |"]
    lines.append("|---|---|---|---|---|---|---|")
    for run in result["runs"]:
        s = summary(run)
        lines.append(
            f"| {run['loss']} | {run['seed']} | {s['reward_start']:.3f} | {s['reward_end']:.3f} "
            f"| {s['ess_batch']:.3f} | {s['train_s']:.0f} | {s['wall_s']:.0f} |"
        )
    lines += ["", verdict(by_loss), ""]
    lines += sensitivity_section(result)
    lines += ["![reward and ESS](async.png)", ""]
    return "\n".join(lines)


def sensitivity_section(result: dict[str, Any]) -> list[str]:
    """The table of the ``sensitivity`` part and what it says, if it was run."""
    runs = result.get("sensitivity")
    if not runs:
        return []
    cfg = result["settings"]
    lines = [
        "## Staleness or step size?",
        "",
        f"Seed(s) {cfg['sensitivity_seeds']}, {cfg['steps']} steps each: both losses at "
        f"`max_head_offpolicyness={cfg['offpolicyness']}` with lr {cfg['sensitivity_lr']:g}, "
        f"and on-policy (`max_head_offpolicyness=0`) with lr {cfg['lr']:g}.",
        "",
        "| loss | max_head_offpolicyness | lr | seed | reward, first 5 | reward, last 5 | change "
        "| mean staleness | mean ESS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        s = summary(run)
        lines.append(
            f"| {LOSS_NAMES.get(run['loss'], run['loss'])} | {run['offpolicyness']} "
            f"| {run['lr']:g} | {run['seed']} | {s['reward_start']:.3f} | {s['reward_end']:.3f} "
            f"| {s['reward_end'] - s['reward_start']:+.3f} | {s['staleness']:.2f} "
            f"| {s['ess_batch']:.3f} |"
        )
    lines.append("")

    def cell(loss: str, k: int, lr: float) -> tuple[float, float] | None:
        """Mean (start, end) reward of the runs of one cell of the sensitivity part."""
        got = [
            summary(r)
            for r in runs
            if r["loss"] == loss and r["offpolicyness"] == k and math.isclose(r["lr"], lr)
        ]
        if not got:
            return None
        return (
            statistics.fmean(g["reward_start"] for g in got),
            statistics.fmean(g["reward_end"] for g in got),
        )

    k, lr, slr = cfg["offpolicyness"], cfg["lr"], cfg["sensitivity_lr"]
    ess_s, grpo_s = cell("ess", k, slr), cell("grpo", k, slr)
    ess_0, grpo_0 = cell("ess", 0, lr), cell("grpo", 0, lr)
    said = []
    if ess_s and grpo_s:
        e, g = ess_s[1], grpo_s[1]
        if abs(e - g) < 0.05:
            how = "the two end level"
        elif e > g:
            how = "ESS still ends higher"
        else:
            how = "**ESS does worse**"
        said.append(
            f"At max_head_offpolicyness={k} with lr {slr:g} {how}: last-5-step reward "
            f"{e:.3f} (ESS) against {g:.3f} (AReaL's decoupled PPO)."
        )
    if ess_0 and grpo_0:
        de, dg = ess_0[1] - ess_0[0], grpo_0[1] - grpo_0[0]
        main_gain = [
            summary(r)["reward_end"] - summary(r)["reward_start"]
            for r in result["runs"]
            if r["loss"] == "grpo"
        ]
        stale_gain = statistics.fmean(main_gain) if main_gain else None
        if dg < 0.02 < de:
            why = (
                f": AReaL's loss does not gain at lr {lr:g} even without staleness, so in the "
                "main table it is the step size more than the staleness that it does not "
                "tolerate."
            )
        elif dg >= 0.02 and stale_gain is not None and stale_gain < 0.02:
            why = (
                f": AReaL's loss gains at lr {lr:g} on-policy but not at "
                f"max_head_offpolicyness={k} (main table, {stale_gain:+.3f}); what it does not "
                "tolerate is staleness at that step size, not the step size alone."
            )
        else:
            why = "."
        said.append(
            f"On-policy with lr {lr:g}, the reward changes by {de:+.3f} (ESS) and {dg:+.3f} "
            f"(AReaL's decoupled PPO){why}"
        )
    if said:
        lines += [
            " ".join(said)
            + " One seed per cell: a reading of this tiny setup, not a ranking of the losses.",
            "",
        ]
    return lines


def verdict(by_loss: dict[str, list[dict[str, float]]]) -> str:
    """One plain sentence on which loss ended higher (no claim beyond these seeds)."""
    if not {"ess", "grpo"} <= by_loss.keys():
        return "Only one loss was run."
    end = {k: statistics.fmean(r["reward_end"] for r in v) for k, v in by_loss.items()}
    gain = {
        k: statistics.fmean(r["reward_end"] - r["reward_start"] for r in v)
        for k, v in by_loss.items()
    }
    n = len(by_loss["ess"])
    if abs(end["ess"] - end["grpo"]) < 0.01:
        head = "ESS and AReaL's loss end level here"
    else:
        head = "**ESS does worse here**" if end["ess"] < end["grpo"] else "ESS ends higher here"
    return (
        f"{head}: mean reward over the last {EDGE} steps {end['ess']:.3f} (ESS) against "
        f"{end['grpo']:.3f} (AReaL's decoupled PPO), a change from the start of "
        f"{gain['ess']:+.3f} against {gain['grpo']:+.3f}, over {n} seed(s) of one tiny task: "
        "a measurement of this setup, not a general ranking."
    )


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ess": "tab:blue", "grpo": "tab:orange"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    for loss in LOSS_NAMES:
        runs = [r for r in result["runs"] if r["loss"] == loss]
        if not runs:
            continue
        for key, ax in (("reward_mean", axes[0]), ("ess_batch", axes[1])):
            series = [[s[key] for s in r["steps"]] for r in runs]
            width = min(len(x) for x in series)
            for x in series:
                ax.plot(_smooth(x), color=colors[loss], alpha=0.25, lw=0.8)
            mean = [statistics.fmean(x[i] for x in series) for i in range(width)]
            label = f"{LOSS_NAMES[loss]}, mean of {len(runs)} seed(s)"
            ax.plot(_smooth(mean), color=colors[loss], lw=2.2, label=label)
    cfg = result["settings"]
    k = cfg["offpolicyness"]
    at_bound = [s["step"] for r in result["runs"] for s in r["steps"] if s["staleness_max"] == k]
    reached = f"staleness {k} from step {min(at_bound)}" if at_bound else f"staleness < {k}"
    axes[0].set_title("batch reward (5-step moving average; thin: single seeds)")
    axes[0].set_ylabel("mean reward of the step's completions")
    axes[1].set_title("ESS of the batch's behaviour weights (5-step moving average)")
    axes[1].set_ylabel("ESS")
    axes[1].set_ylim(0, 1.02)
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=9)
    fig.suptitle(
        f"AReaL asynchronous training, max_head_offpolicyness={k} ({reached}), "
        f"{cfg['prompts_per_step']}x{cfg['group_size']} completions a step, lr {cfg['lr']:g}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _smooth(x: list[float], k: int = EDGE) -> list[float]:
    return [statistics.fmean(x[max(0, i - k + 1) : i + 1]) for i in range(len(x))]


def _round(x: Any) -> Any:
    """Floats to 6 significant digits, recursively (keeps the JSON small)."""
    if isinstance(x, float):
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_round(v) for v in x]
    return x


def dumps(result: dict[str, Any]) -> str:
    """The result as JSON: indented, except one line per step record."""
    result = _round(result)
    runs = []
    for run in result["runs"]:
        head = json.dumps({k: v for k, v in run.items() if k != "steps"})
        steps = ",\n".join("   " + json.dumps(s, separators=(",", ":")) for s in run["steps"])
        runs.append(f'{head[:-1]}, "steps": [\n{steps}\n  ]}}')
    text = json.dumps({**result, "runs": "RUNS"}, indent=1)
    return text.replace('"RUNS"', "[\n  " + ",\n  ".join(runs) + "\n ]") + "\n"


def write(result: dict[str, Any], out: Path) -> None:
    (out / "async.md").write_text(markdown(result))
    try:
        plot(result, out / "async.png")
    except ImportError:
        print(
            "matplotlib is not installed here: draw async.png with "
            f"`.venv/bin/python benchmarks/areal_async.py --out {out} --replot`"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "async.json"
    previous = json.loads(path.read_text()) if path.exists() else None
    if args.replot:
        if previous is None:
            raise SystemExit(f"--replot: no {path}")
        result = previous
    else:
        result = measure(args, previous)
        path.write_text(dumps(result))
    write(result, out)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
