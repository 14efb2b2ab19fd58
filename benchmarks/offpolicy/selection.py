"""The stale-rollout study's selection rule (SELECTION_RULE.md), its tables and its plots.

A candidate *holds* in an off-policy cell when its final reward, paired by seed with tuned
clipping (the better of the clip grid in that cell), satisfies mean(Δ) >= -max(0.03, sd(Δ)); it
is recommended when it holds in every off-policy cell of both tasks and never collapses.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from offpolicy.methods import CANDIDATES

FLOOR = 0.03
"""The rule's floor on the tolerated paired shortfall."""

#: Where a method was not run because it is exactly another one there: with the fp32 sampler
#: and k = 0 the proximal policy is the behaviour policy (mu = pi_prox), so the candidates are
#: P3O, decoupled clipping and TIS are clip-0.2 (weight 1).
REDUCES_TO = {
    "ess-p4o": "ess",
    "ess-prox": "ess",
    "ess-dec": "ess",
    "ess-prox-vcpo": "ess-vcpo",
    "decoupled-clip": "clip-0.2",
    "tis": "clip-0.2",
}

RULE_METHODS = ("ess", *CANDIDATES, "ess-vcpo")
"""Methods the rule table shows (the candidates, with the paper's objective for reference)."""


def _runs(result: dict[str, Any], cell: str, method: str) -> dict[int, dict[str, Any]]:
    """Runs of ``method`` in ``cell`` by seed, through :data:`REDUCES_TO` where not run."""
    runs = {
        r["seed"]: r for r in result["runs"] if r["condition"] == cell and r["method"] == method
    }
    if not runs and method in REDUCES_TO:
        cond = result["conditions"][cell]
        if cond["staleness"] == 0 and cond["sampler"] == "fp32" and cond["temperature"] == 1.0:
            return _runs(result, cell, REDUCES_TO[method])
    return runs


def off_policy_cells(result: dict[str, Any]) -> list[str]:
    """Cells where some ratio differs from 1: staleness, a second epoch, or a mismatched sampler."""
    return [
        name
        for name, c in result["conditions"].items()
        if c["staleness"] > 0 or c["epochs"] > 1 or c["sampler"] != "fp32" or c["temperature"] != 1
    ]


def tuned_clip(result: dict[str, Any], cell: str) -> str | None:
    grid = [m for m, v in result["methods"].items() if v.get("in_grid")]
    means = {
        m: statistics.fmean(r["final_reward"] for r in _runs(result, cell, m).values())
        for m in grid
        if _runs(result, cell, m)
    }
    return max(means, key=means.get) if means else None


def evaluate(result: dict[str, Any], methods: Sequence[str] = RULE_METHODS) -> dict[str, Any]:
    """Per method and off-policy cell: paired Δ against tuned clip, holds, collapses."""
    out: dict[str, Any] = {"cells": {}, "methods": {}}
    for cell in off_policy_cells(result):
        best = tuned_clip(result, cell)
        if best is None:
            continue
        clip = _runs(result, cell, best)
        row: dict[str, Any] = {"tuned_clip": best}
        for m in methods:
            runs = _runs(result, cell, m)
            seeds = sorted(set(runs) & set(clip))
            if not seeds:
                continue
            deltas = [runs[s]["final_reward"] - clip[s]["final_reward"] for s in seeds]
            mean = statistics.fmean(deltas)
            sd = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
            row[m] = {
                "delta_mean": mean,
                "delta_sd": sd,
                "holds": mean >= -max(FLOOR, sd),
                "collapsed": sum(bool(r["collapsed"]) for r in runs.values()),
                "runs": len(runs),
            }
        out["cells"][cell] = row
    for m in methods:
        rows = [row[m] for row in out["cells"].values() if m in row]
        if not rows:
            continue
        out["methods"][m] = {
            "cells": len(rows),
            "holds": sum(r["holds"] for r in rows),
            "collapsed": sum(r["collapsed"] for r in rows),
            "delta_mean": statistics.fmean(r["delta_mean"] for r in rows),
            "passes": all(r["holds"] for r in rows) and not any(r["collapsed"] for r in rows),
        }
    return out


def markdown(result: dict[str, Any]) -> list[str]:
    """The rule's table for one task: paired Δ vs tuned clip per cell, and the verdicts."""
    ev = evaluate(result)
    methods = [m for m in RULE_METHODS if m in ev["methods"]]
    lines = [
        "## Selection rule (SELECTION_RULE.md): paired Δ against tuned clipping",
        "",
        "Mean ± sd over seeds of final(method) − final(tuned clip), same seed; ✓ holds "
        f"(mean ≥ −max({FLOOR}, sd)), ✗ does not; `c` = collapsed runs. Cells where a candidate "
        "is exactly another method (k = 0: π_prox = μ) use that method's runs.",
        "",
        "| cell | tuned clip | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for cell, row in ev["cells"].items():
        cells = []
        for m in methods:
            v = row.get(m)
            if v is None:
                cells.append("")
                continue
            mark = "✓" if v["holds"] else "✗"
            coll = f" {v['collapsed']}c" if v["collapsed"] else ""
            cells.append(f"{v['delta_mean']:+.3f} ± {v['delta_sd']:.3f} {mark}{coll}")
        lines.append(f"| {cell} | {row['tuned_clip']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| method | cells held | collapsed runs | mean Δ | passes this task |",
        "|---|---|---|---|---|",
    ]
    for m in methods:
        v = ev["methods"][m]
        lines.append(
            f"| {m} | {v['holds']}/{v['cells']} | {v['collapsed']} | {v['delta_mean']:+.3f} | "
            f"{'yes' if v['passes'] else 'no'} |"
        )
    lines += [
        "",
        "The regulariser's tail (linear below d = −50): see the table of smallest log-ratios "
        "above, per cell and method.",
        "",
    ]
    return lines


def decision(results: dict[str, dict[str, Any]]) -> list[str]:
    """The decision over both tasks (``results``: part name -> result)."""
    evs = {name: evaluate(r) for name, r in results.items()}
    lines = ["## Decision over both tasks", ""]
    passing = []
    for m in CANDIDATES:
        verdicts = [evs[t]["methods"].get(m, {}).get("passes", False) for t in evs]
        held = ", ".join(
            f"{t}: {evs[t]['methods'][m]['holds']}/{evs[t]['methods'][m]['cells']} cells, "
            f"{evs[t]['methods'][m]['collapsed']} collapsed"
            for t in evs
            if m in evs[t]["methods"]
        )
        missing = [t for t in evs if m not in evs[t]["methods"]]
        if missing:
            held += f"; not run on {', '.join(missing)}"
        lines.append(f"- `{m}`: {'passes' if all(verdicts) else 'fails'} ({held})")
        if all(verdicts) and len(verdicts) == len(evs):
            passing.append(m)
    if passing:
        first = evs[next(iter(evs))]["methods"]
        best = max(passing, key=lambda m: first[m]["delta_mean"])
        lines += ["", f"Recommended by the rule: `{best}`."]
    else:
        lines += ["", "No candidate passes the rule on both tasks: none is recommended."]
    return lines


def plot_sensitivity(result: dict[str, Any], out: Path) -> None:
    """``sensitivity.png``: final reward against learning rate, per method, one panel per
    (k, epochs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = result["conditions"]
    panels = sorted(
        {(c["staleness"], c["epochs"]) for c in conds.values()}, key=lambda x: (x[1], x[0])
    )
    lrs = sorted({c["lr"] for c in conds.values() if c.get("lr")})
    if not lrs or not panels:
        return
    ks = sorted({k for k, _ in panels})
    eps = sorted({e for _, e in panels})
    fig, axes = plt.subplots(
        len(eps), len(ks), figsize=(3.4 * len(ks), 3.0 * len(eps) + 0.9), squeeze=False, sharey=True
    )
    styles = {"ess": ("black", "-"), "clip-0.2": ("tab:blue", "--"), "clip-0.4": ("tab:cyan", "--")}
    palette = [
        "tab:red",
        "tab:orange",
        "tab:green",
        "tab:purple",
        "tab:brown",
        "tab:pink",
        "tab:olive",
        "tab:gray",
    ]
    others = [m for m in result["methods"] if m not in styles]
    for i, m in enumerate(others):
        styles[m] = (palette[i % len(palette)], "-" if m.startswith("ess") else ":")
    for (k, e), ax in ((p, axes[eps.index(p[1])][ks.index(p[0])]) for p in panels):
        for m in result["methods"]:
            xs, ys, es = [], [], []
            for lr in lrs:
                cell = next(
                    (
                        n
                        for n, c in conds.items()
                        if c["lr"] == lr and c["staleness"] == k and c["epochs"] == e
                    ),
                    None,
                )
                runs = list(_runs(result, cell, m).values()) if cell else []
                if runs:
                    vals = [r["final_reward"] for r in runs]
                    xs.append(lr)
                    ys.append(statistics.fmean(vals))
                    es.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            if xs:
                color, ls = styles[m]
                ax.errorbar(
                    xs,
                    ys,
                    yerr=es,
                    color=color,
                    linestyle=ls,
                    marker="o",
                    ms=3,
                    capsize=2,
                    lw=1.2,
                    label=m,
                )
        ax.set_xscale("log")
        ax.set_xlim(min(lrs) / 1.5, max(lrs) * 1.5)
        ax.tick_params(labelleft=True)  # panels of a sparse grid have no left neighbour
        ax.set_xticks(lrs, [f"{x:g}" for x in lrs], fontsize=8)
        ax.minorticks_off()
        ax.set_title(f"k = {k}, {e} epoch{'s' if e > 1 else ''}", fontsize=10)
        ax.grid(alpha=0.3)
        if ks.index(k) == 0:
            ax.set_ylabel("final reward")
        if eps.index(e) == len(eps) - 1:
            ax.set_xlabel("learning rate")
    for e in eps:  # panels missing from the grid
        for k in ks:
            if (k, e) not in panels:
                axes[eps.index(e)][ks.index(k)].set_visible(False)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    ncol = max(1, min(len(labels), 6))
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    rows = math.ceil(len(labels) / ncol)
    fig.suptitle(
        f"Final reward vs learning rate ({result['config']['task']}, mean ± sd over seeds)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.035 * rows + 0.02, 1, 0.97))
    fig.savefig(out / "sensitivity.png", dpi=110)
    plt.close(fig)
