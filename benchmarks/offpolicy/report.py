"""Summary statistics, Markdown tables and plots of the off-policy study."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from offpolicy.methods import Method


def _mean_std(xs) -> tuple[float, float]:
    xs = list(xs)
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def verdict(a: tuple[float, float], b: tuple[float, float]) -> str:
    """Compare mean±std ``a`` (ESS) with ``b``: tie when the gap is within the larger std
    (or within 0.005, for runs whose seeds agree to rounding)."""
    gap = a[0] - b[0]
    if abs(gap) <= max(a[1], b[1], 0.005):
        return "tie (within spread)"
    return "ESS higher" if gap > 0 else "ESS lower"


def summarize(
    runs: list[dict[str, Any]], conditions: Sequence[str], methods: Sequence[Method]
) -> dict[str, Any]:
    """Per condition: per-method final reward mean/std, collapses, tuned/untuned clip grid."""
    summary: dict[str, Any] = {}
    for cname in conditions:
        per: dict[str, Any] = {}
        for m in methods:
            rs = [r for r in runs if r["condition"] == cname and r["method"] == m.name]
            if not rs:
                continue
            mean, std = _mean_std(r["final_reward"] for r in rs)
            per[m.name] = {
                "final_mean": mean,
                "final_std": std,
                "peak_mean": statistics.fmean(max(r["eval_reward"]) for r in rs),
                "start_mean": statistics.fmean(r["eval_reward"][0] for r in rs),
                "collapsed": sum(r["collapsed"] for r in rs),
                "runs": len(rs),
                "final_ess_mean": statistics.fmean(statistics.fmean(r["ess"][-10:]) for r in rs),
                "min_ess_mean": statistics.fmean(min(r["ess_min"]) for r in rs),
                "log_ratio_min": min(min(r["log_ratio_min"]) for r in rs),
                "frac_below_10_max": max(max(r["frac_below_10"]) for r in rs),
                "skipped_updates": sum(r["skipped_updates"] for r in rs),
            }
            if "call_ess_min" in rs[0]:
                per[m.name]["call_ess_min"] = statistics.fmean(min(r["call_ess_min"]) for r in rs)
        grid = [m.name for m in methods if m.in_grid and m.name in per]
        entry: dict[str, Any] = {"methods": per}
        if grid:
            best = max(grid, key=lambda g: per[g]["final_mean"])
            grid_runs = [
                r["final_reward"] for r in runs if r["condition"] == cname and r["method"] in grid
            ]
            entry["tuned_clip"] = {
                "method": best,
                "final_mean": per[best]["final_mean"],
                "final_std": per[best]["final_std"],
            }
            entry["untuned_clip"] = {
                "final_mean": statistics.fmean(per[g]["final_mean"] for g in grid),
                "final_std": statistics.stdev(grid_runs) if len(grid_runs) > 1 else 0.0,
                "grid": grid,
                "collapsed": sum(per[g]["collapsed"] for g in grid),
                "runs": sum(per[g]["runs"] for g in grid),
            }
        others = [m for m in per if not m.startswith("ess")]
        if others:
            best_other = max(others, key=lambda m: per[m]["final_mean"])
            entry["best_other"] = {
                "method": best_other,
                "final_mean": per[best_other]["final_mean"],
                "final_std": per[best_other]["final_std"],
            }
        if "ess" in per:
            e = (per["ess"]["final_mean"], per["ess"]["final_std"])
            for key in ("tuned_clip", "untuned_clip", "best_other"):
                if key in entry:
                    t = (entry[key]["final_mean"], entry[key]["final_std"])
                    entry[key]["ess_vs"] = verdict(e, t)
        summary[cname] = entry
    return summary


def _fmt(d: dict[str, Any] | None) -> str:
    if d is None:
        return "n/a"
    return f"{d['final_mean']:.3f} ± {d['final_std']:.3f}"


def _method_table(
    title: str,
    summary: dict[str, Any],
    methods: list[str],
    cell: Callable[[dict[str, Any]], str],
) -> list[str]:
    """A condition x method Markdown table; cells of methods a condition did not run read n/a."""
    methods = [m for m in methods if any(m in e["methods"] for e in summary.values())]
    if not methods:
        return []
    lines = ["", f"## {title}", "", "| condition | " + " | ".join(methods) + " |"]
    lines.append("|---|" + "---|" * len(methods))
    for cname, entry in summary.items():
        per = entry["methods"]
        if not any(m in per for m in methods):
            continue
        cells = (cell(per[m]) if m in per else "n/a" for m in methods)
        lines.append(f"| {cname} | " + " | ".join(cells) + " |")
    return lines


def _versus_whole(result: dict[str, Any]) -> list[str]:
    """Micro-batch part: each variant's per-seed final reward against the one-call run's."""
    whole = [m for m in result["methods"] if m.endswith("-whole")]
    if not whole:
        return []
    lines = [
        "## Against one call per update (same seed)",
        "",
        "| condition | variant | final reward | mean abs. difference from one call | largest "
        "| seeds identical to one call |",
        "|---|---|---|---|---|---|",
    ]
    for cname in result["conditions"]:
        ref = {
            r["seed"]: r["final_reward"]
            for r in result["runs"]
            if r["condition"] == cname and r["method"] == whole[0]
        }
        for m in result["methods"]:
            rs = [r for r in result["runs"] if r["condition"] == cname and r["method"] == m]
            diffs = [abs(r["final_reward"] - ref[r["seed"]]) for r in rs if r["seed"] in ref]
            if not diffs:
                continue
            mean, std = _mean_std(r["final_reward"] for r in rs)
            same = sum(d == 0 for d in diffs)
            lines.append(
                f"| {cname} | {m} | {mean:.3f} ± {std:.3f} | {statistics.fmean(diffs):.4f} | "
                f"{max(diffs):.4f} | {same}/{len(diffs)} |"
            )
    return lines


def _paired(result: dict[str, Any]) -> list[str]:
    """ESS minus each other method, paired by seed (same warm start, prompts and sampler seeds):
    mean ± std of the per-seed difference in final reward, and in how many seeds ESS is ahead.
    Pairing removes the spread between seeds' warm starts, which dominates the unpaired std."""
    methods = [m for m in result["methods"] if m != "ess"]
    final = {(r["condition"], r["method"], r["seed"]): r["final_reward"] for r in result["runs"]}
    rows = []
    for cname in result["conditions"]:
        cells = []
        for m in methods:
            diffs = [
                final[(cname, "ess", s)] - final[(cname, m, s)]
                for s in result["seeds"]
                if (cname, "ess", s) in final and (cname, m, s) in final
            ]
            if not diffs:
                cells.append("n/a")
                continue
            mean, std = _mean_std(diffs)
            ahead = sum(d > 0 for d in diffs)
            cells.append(f"{mean:+.3f} ± {std:.3f} ({ahead}/{len(diffs)})")
        if any(c != "n/a" for c in cells):
            rows.append(f"| {cname} | " + " | ".join(cells) + " |")
    if "ess" not in result["methods"] or not rows:
        return []
    return [
        "",
        "## ESS minus each method, paired by seed (final reward)",
        "",
        "Mean ± std over seeds of (ESS − method) for the same seed; in parentheses, the seeds "
        "where ESS finished higher.",
        "",
        "| condition | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
        *rows,
    ]


def _describe_condition(v: dict[str, Any]) -> str:
    parts = [f"sampler {v['sampler']}", f"T={v['temperature']}"]
    if v["report_untempered"]:
        parts.append("engine reports un-tempered log-probs")
    parts += [f"staleness {v['staleness']}", f"epochs {v['epochs']}"]
    return ", ".join(parts)


def markdown(result: dict[str, Any], notes: Sequence[str] = ()) -> str:
    env, cfg, summary = result["environment"], result["config"], result["summary"]
    lines = [
        "# Learning off-policy in harsh regimes: ESS objective (and its regulariser tails) vs "
        "clipped surrogates, CISPO, TIS, MIS",
        "",
        f"Command: `{env['command']}`  ",
        f"Date: {env['date']}; machine: {env['machine']}, {env['cpu_count']} CPUs, "
        f"{env['os']}; python {env['python']}, torch {env['torch']}, transformers "
        f"{env['transformers']}; 1 torch thread per worker, {env.get('workers', '?')} workers; "
        f"wall time {env['wall_seconds']:.0f} s"
        + (f" ({env['shared_note']})" if env.get("shared_note") else "")
        + "."
        + (f" **Partial results: {env['partial']} finished.**" if env.get("partial") else "")
        + (
            f" Tables and plots rebuilt from results.json (`--replot`) on {env['replotted']}."
            if env.get("replotted")
            else ""
        ),
        "",
        f"Setup: tiny Qwen2 (hidden {cfg['hidden_size']}, {cfg['num_layers']} layers), task "
        f"`{cfg['task']}` over `{cfg['alphabet']}` (prompt {cfg['prompt_len']} characters; reward "
        "= fraction of target positions reproduced), warm-started by "
        f"{cfg['warm_steps']} supervised steps per seed (same weights for every method). GRPO: "
        f"{cfg['prompts_per_step']} prompts x {cfg['group_size']} samples per step, "
        f"{cfg['steps']} RL steps, Adam lr {cfg['lr']}, grad-norm clip {cfg['max_grad_norm']}, "
        f"token-mean loss; seeds {result['seeds']}. Trainer float32, temperature 1; every "
        "method gets the rollout engine's log-probabilities as old log-probs; TIS / MIS (cap "
        f"{result['correction_cap']}) wrap clip-0.2 around the trainer's recomputed old "
        "log-probs. No setting was tuned for any ESS variant.",
        "",
        f"Final reward = mean of the last 3 evaluations ({cfg['eval_prompts']} fixed prompts, one "
        "temperature-1 sample each); mean ± std over seeds. Tuned clip = best point of the clip "
        "grid per condition, chosen on these same seeds (optimistic for the baseline); untuned "
        "clip = grid average (± std over all grid runs). Verdict: tie when the gap is within "
        "the larger std (or 0.005). Collapse = eval reward below half its peak for the last >= 2 "
        "evaluations.",
        "",
        *notes,
    ]
    if any("ess" in e["methods"] for e in summary.values()):
        lines += [
            "## Summary",
            "",
            "| condition | start | ESS (no tuning) | tuned clip (best ε) | ESS vs tuned | untuned "
            "clip (grid avg) | ESS vs untuned | best non-ESS method | ESS vs it |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    lines += _versus_whole(result)
    for cname, entry in summary.items():
        per = entry["methods"]
        if "ess" not in per:
            continue
        tuned, untuned, best = (entry.get(k) for k in ("tuned_clip", "untuned_clip", "best_other"))
        lines.append(
            f"| {cname} | {per['ess']['start_mean']:.3f} | {_fmt(per['ess'])} | "
            + (f"{_fmt(tuned)} ({tuned['method']}) | {tuned['ess_vs']} | " if tuned else "n/a | | ")
            + (f"{_fmt(untuned)} | {untuned['ess_vs']} | " if untuned else "n/a | | ")
            + (f"{_fmt(best)} ({best['method']}) | {best['ess_vs']} |" if best else "n/a | |")
        )
    for key, label in (
        ("tuned_clip", "tuned clip"),
        ("untuned_clip", "untuned clip"),
        ("best_other", "the best non-ESS method"),
    ):
        verdicts = [e[key]["ess_vs"] for e in summary.values() if "ess_vs" in e.get(key, {})]
        if verdicts:
            counts = ", ".join(
                f"{v} in {verdicts.count(v)}"
                for v in ("ESS higher", "tie (within spread)", "ESS lower")
                if v in verdicts
            )
            lines.append(f"\nESS vs {label}, over {len(verdicts)} conditions: {counts}.")
    methods = list(result["methods"])
    lines += _method_table("Final reward (mean ± std over seeds)", summary, methods, _fmt)
    lines += _paired(result)
    lines += _method_table(
        "Collapsed runs (of runs per cell)",
        summary,
        methods,
        lambda d: f"{d['collapsed']}/{d['runs']}",
    )
    lines += _method_table(
        "Batch ESS of the ratios π_θ/μ before each update: mean of the last 10 steps / lowest",
        summary,
        methods,
        lambda d: f"{d['final_ess_mean']:.3f} / {d['min_ess_mean']:.3f}",
    )
    lines += _method_table(
        "Smallest log-ratio d = log π_θ − log μ of any token (over seeds and steps) / largest "
        "share of tokens with d < −10 in one step (where the regulariser tails differ)",
        summary,
        methods,
        lambda d: f"{d['log_ratio_min']:.1f} / {d['frac_below_10_max']:.4f}",
    )
    phase2 = [m for m in methods if "mb" in m or m.endswith("whole")]
    lines += _method_table(
        "Per-call ESS at micro-batching: lowest per-call ESS of a run (mean over seeds)",
        summary,
        [m for m in phase2 if "call" in m or m.endswith("whole")],
        lambda d: f"{d['call_ess_min']:.3f}" if "call_ess_min" in d else "n/a",
    )
    skipped = {
        (c, m): e["methods"][m]["skipped_updates"]
        for c, e in summary.items()
        for m in e["methods"]
        if e["methods"][m]["skipped_updates"]
    }
    lines += [
        "",
        "Skipped updates (non-finite loss or gradient): "
        + (", ".join(f"{c}/{m}: {n}" for (c, m), n in skipped.items()) or "none")
        + ".",
        "",
        "Conditions: "
        + "; ".join(f"`{k}`: {_describe_condition(v)}" for k, v in result["conditions"].items())
        + ".",
        "",
        "Plots: `reward_curves.png` (eval reward, mean ± std over seeds), `ess_curves.png` "
        "(lowest batch ESS per step), `ratio_min.png` (smallest log-ratio per step), "
        "`sweep.png` (final reward against the harshness knob, where a sweep ran), "
        "`final_reward.png`.",
        "",
    ]
    return "\n".join(lines)


STYLE: dict[str, tuple[str, str, float]] = {
    "ess": ("black", "-", 2.4),
    "ess-clamp10": ("#e7298a", "--", 1.8),
    "ess-tail10": ("#66a61e", ":", 1.8),
    "clip-0.1": ("#c6dbef", "-", 1.2),
    "clip-0.2": ("#6baed6", "-", 1.2),
    "clip-0.4": ("#2171b5", "-", 1.2),
    "clip-0.6": ("#08306b", "-", 1.2),
    "clip-higher": ("#6a51a3", "--", 1.2),
    "cispo": ("#fd8d3c", "-", 1.4),
    "tis": ("#2ca02c", "-.", 1.4),
    "mis": ("#8c564b", "-.", 1.4),
    "ess-noreg": ("#1b9e77", "-", 1.8),
    "ess-nocap": ("#d95f02", "--", 1.8),
    "ess-ref-whole": ("black", "-", 2.0),
    "ess-ref-mb8-call": ("#1f77b4", "--", 1.5),
    "ess-ref-mb8-step": ("#1f77b4", "-", 1.5),
    "ess-ref-mb1-call": ("#d62728", "--", 1.5),
    "ess-ref-mb1-step": ("#d62728", "-", 1.5),
}


def _band(ax, xs, ys_runs, name: str, smooth: int = 1) -> None:
    t = torch.tensor(ys_runs, dtype=torch.float64)
    if smooth > 1:
        k = torch.ones(1, 1, smooth, dtype=torch.float64) / smooth
        pad = torch.nn.functional.pad(t.unsqueeze(1), (smooth - 1, 0), mode="replicate")
        t = torch.nn.functional.conv1d(pad, k).squeeze(1)
    mean = t.mean(0)
    std = t.std(0) if t.shape[0] > 1 else torch.zeros_like(mean)
    color, ls, lw = STYLE.get(name, ("gray", "-", 1.0))
    z = 3 if name.startswith("ess") else 2
    ax.plot(xs, mean, color=color, ls=ls, lw=lw, label=name, zorder=z)
    ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.10, lw=0, zorder=1)


def _grid_figure(plt, n: int):
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(5.2 * ncols, 3.9 * nrows), squeeze=False, sharex=True
    )
    return fig, axes


def _legend(fig, axes) -> int:
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    ncol = max(1, min(len(labels), 8 if axes.shape[1] > 1 else 3))
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    return -(-len(labels) // ncol)  # legend rows


def plot(result: dict[str, Any], out: Path, prefix: str = "") -> None:
    """``reward_curves``, ``ess_curves``, ``ratio_min``, ``sweep`` and ``final_reward`` PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, conds = result["runs"], list(result["conditions"])
    methods = list(result["methods"])

    def by(c: str, m: str) -> list[dict[str, Any]]:
        return [r for r in runs if r["condition"] == c and r["method"] == m]

    kinds = {
        "reward_curves": ("eval reward", "Eval reward (mean ± std over seeds)"),
        "ess_curves": (
            "batch ESS",
            "Lowest batch ESS of π_θ/μ over the updates on each batch (5-step average)",
        ),
        "ratio_min": (
            "min log-ratio d",
            "Smallest log π_θ − log μ of any token, per step (mean ± std over seeds)",
        ),
    }
    for kind, (ylabel, title) in kinds.items():
        fig, axes = _grid_figure(plt, len(conds))
        for ax, c in zip(axes.flat, conds, strict=False):
            for m in methods:
                rs = by(c, m)
                if not rs:
                    continue
                if kind == "reward_curves":
                    _band(ax, rs[0]["eval_steps"], [r["eval_reward"] for r in rs], m)
                else:
                    key = "ess_min" if kind == "ess_curves" else "log_ratio_min"
                    steps = list(range(1, len(rs[0][key]) + 1))
                    _band(ax, steps, [r[key] for r in rs], m, smooth=5 if key == "ess_min" else 1)
            ax.set_title(c, fontsize=11)
            ax.grid(alpha=0.3)
            ax.set_ylabel(ylabel)
            if kind == "ess_curves":
                ax.set_ylim(-0.02, 1.02)
        for ax in axes.flat[len(conds) :]:
            ax.axis("off")
        for ax in axes[-1]:
            ax.set_xlabel("RL step")
        rows = _legend(fig, axes)
        fig.suptitle(title, fontsize=12 if axes.shape[1] > 1 else 9)
        bottom = 0.035 * rows * (2 if axes.shape[0] == 1 else 1) + 0.03
        fig.tight_layout(rect=(0, bottom, 1, 0.97))
        fig.savefig(out / f"{prefix}{kind}.png", dpi=100)
        plt.close(fig)

    summary = result["summary"]
    sweep_conds = [c for c in conds if result["conditions"][c].get("sweep")]
    if sweep_conds:
        fig, ax = plt.subplots(figsize=(7.5, 4.4))
        levels = [result["conditions"][c]["level"] for c in sweep_conds]
        for m in methods:
            pts = [
                (lv, summary[c]["methods"][m])
                for lv, c in zip(levels, sweep_conds, strict=True)
                if m in summary[c]["methods"]
            ]
            if not pts:
                continue
            color, ls, lw = STYLE.get(m, ("gray", "-", 1.0))
            ax.errorbar(
                [p[0] for p in pts],
                [p[1]["final_mean"] for p in pts],
                yerr=[p[1]["final_std"] for p in pts],
                color=color,
                ls=ls,
                lw=lw,
                marker="o",
                ms=3,
                capsize=2,
                label=m,
            )
        if result["conditions"][sweep_conds[0]]["sweep"] == "staleness":
            ax.set_xscale("log", base=2)
            ax.set_xlabel("staleness k (updates between sampling and training; 2 epochs per batch)")
        else:
            ax.set_xlabel(
                "rollout temperature T (log-probs of the distribution sampled; T = 1: on-policy)"
            )
        ax.set_ylabel("final reward (mean ± std)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        ax.set_title("Harshness sweep")
        fig.tight_layout()
        fig.savefig(out / f"{prefix}sweep.png", dpi=100)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(8, 2.2 * len(conds)), 4.4))
    width = 0.85 / max(1, len(methods))
    for j, m in enumerate(methods):
        xs, ms, ss = [], [], []
        for i, c in enumerate(conds):
            d = summary[c]["methods"].get(m)
            if d is None:
                continue
            xs.append(i + (j - (len(methods) - 1) / 2) * width)
            ms.append(d["final_mean"])
            ss.append(d["final_std"])
        if xs:
            color = STYLE.get(m, ("gray", "-", 1.0))[0]
            ax.bar(xs, ms, width, yerr=ss, color=color, label=m, capsize=1.5, edgecolor="white")
    ax.set_xticks(range(len(conds)), conds, fontsize=8)
    ax.set_ylabel("final reward (mean ± std)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(
        ncol=min(6, len(methods)),
        fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.12),
        frameon=False,
    )
    ax.set_title("Final reward per condition")
    fig.tight_layout()
    fig.savefig(out / f"{prefix}final_reward.png", dpi=100)
    plt.close(fig)
