r"""Orchestration of the off-policy study: plan the cells, run them in worker processes, write
``results.json``, ``results.md`` and the plots.

    python benchmarks/offpolicy_study.py                      # full study -> docs/results/offpolicy
    python benchmarks/offpolicy_study.py --quick --out /tmp/offpolicy-quick    # CI smoke (< 3 min)
    python benchmarks/offpolicy_study.py --replot             # tables/plots from results.json

Parts (``--parts``, default all; one pool runs every cell of every part, a cell shared by two
parts runs once):

* ``main``: every condition of :data:`offpolicy.conditions.CONDITIONS` x every method of
  :data:`offpolicy.methods.METHODS` (restricted per condition by
  :data:`~offpolicy.conditions.SUBSETS`, unless ``--methods`` names the methods);
* ``staleness``: :data:`~offpolicy.conditions.STALENESS_SWEEP` x every method, in
  ``<out>/staleness``;
* ``ablation``: ESS without its regulariser and without its cap, in :data:`ABLATION_CONDITIONS`,
  in ``<out>/ablation``;
* ``microbatch`` (issue 15's evidence): :data:`~offpolicy.conditions.PHASE2_CONDITIONS` x
  :data:`~offpolicy.methods.PHASE2_METHODS`, in ``<out>/microbatch``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from offpolicy import report, selection
from offpolicy.conditions import (
    CONDITIONS,
    CONFIRM_CONDITIONS,
    MAP_CONDITIONS,
    MAP_SUBSETS,
    PHASE2_CONDITIONS,
    QUICK_CONDITIONS,
    STALENESS_SWEEP,
    SUBSETS,
    Condition,
)
from offpolicy.methods import (
    ABLATION_METHODS,
    CONFIRM_METHODS,
    CORRECTION_CAP,
    MAP_METHODS,
    METHODS,
    PHASE2_METHODS,
    QUICK_METHODS,
    Method,
)
from offpolicy.train import StudyConfig, run_cell, warm_start_state


def _warm_job(
    args: tuple[StudyConfig, int],
) -> tuple[tuple[StudyConfig, int], dict[str, torch.Tensor]]:
    cfg, seed = args
    return (cfg, seed), warm_start_state(cfg, seed)


def _cell_job(args: tuple) -> dict[str, Any]:
    cfg, condition, method, seed, state = args
    return run_cell(cfg, condition, method, seed, state)


def plan(
    conditions: dict[str, Condition],
    methods: Sequence[Method],
    seeds: Sequence[int],
    subsets: dict[str, Sequence[str]] | None = None,
) -> list[tuple[Condition, Method, int]]:
    """All cells, seed-major (an interrupted study has every cell at fewer seeds), costliest
    first within a seed. TIS/MIS only where trainer-old differs from behaviour; ``subsets``
    restricts a condition to some methods."""
    subsets = subsets or {}
    cells = [
        (c, m, s)
        for s in seeds
        for c in conditions.values()
        for m in methods
        if (not m.needs_trainer_old or c.rollout_correction_applies)
        and (c.name not in subsets or m.name in subsets[c.name])
    ]
    return sorted(cells, key=lambda x: (x[2], -(x[0].cost + 0.5 * (x[1].micro_batch == 1))))


def environment(argv: Sequence[str]) -> dict[str, Any]:
    """Command, date, machine and versions."""
    import transformers

    return {
        "command": shlex.join(["python", "benchmarks/offpolicy_study.py", *argv]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads_per_worker": 1,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="docs/results/offpolicy", help="output directory")
    p.add_argument("--seeds", type=int, default=5, help="seeds per cell")
    p.add_argument("--steps", type=int, default=None, help="RL steps per run")
    p.add_argument("--workers", type=int, default=2, help="processes (1 torch thread each)")
    p.add_argument(
        "--parts",
        nargs="*",
        default=["map", "confirm"],
        help="map, confirm (default: the stale-rollout study, both tasks); main, staleness, "
        "ablation, microbatch (the earlier harsh-regime study)",
    )
    p.add_argument("--conditions", nargs="*", default=None, help=f"subset of {list(CONDITIONS)}")
    p.add_argument("--methods", nargs="*", default=None, help=f"subset of {list(METHODS)}")
    p.add_argument(
        "--snapshot-every",
        type=int,
        default=0,
        help="rewrite results every N finished runs (partial results survive an interruption)",
    )
    p.add_argument("--note", default="", help="free text recorded beside the wall time")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the finished runs of <out>/runs.jsonl and run only the missing cells",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke: 2 seeds, 10 steps, 3 conditions, 8 methods + 2 micro-batch variants",
    )
    p.add_argument(
        "--replot",
        action="store_true",
        help="rebuild results.md and the plots from existing results.json files (no training)",
    )
    return p.parse_args(argv)


_READING = (
    "Reading notes (analytic, not results): the three ESS variants differ only where a token's "
    "log-ratio d leaves [-10, 10] (`ess-tail10` only below -10); the table of smallest "
    "log-ratios says whether that happened. TIS and MIS reduce to clip-0.2 where the trainer's "
    "old log-probs equal the engine's (fp32 sampler, no staleness), so they run only in the "
    "other conditions."
)

_MAP_NOTE = (
    "Stale-rollout study: the candidates with a proximal policy, the paper's objective and the "
    "baselines, over learning rate x staleness k x epochs per batch. The selection rule was "
    "committed before the runs (SELECTION_RULE.md beside this file). In these tables `ess` is "
    "the paper's objective and the ESS rows compare every method with it; the selection is "
    "against tuned clipping."
)

NOTES = {
    "map": [_MAP_NOTE, ""],
    "confirm": [
        _MAP_NOTE,
        "",
        "Confirmation task: sort 6 characters over `abcdefgh`, a larger model (hidden 96, 3 "
        "layers); cells and methods fixed before the runs.",
        "",
    ],
    "main": [
        _READING,
        "",
        "Calibration (before the study, single-seed probes of on-policy ESS): the task is "
        "reversing 8 characters with partial credit. With lr 5e-4 and a 100-step supervised "
        "warm start, the on-policy reward rises over the whole 300-step run (about 0.52 to "
        "0.76), so a run that stops rising or falls can be told from slow learning; with 5 "
        "characters, or lr 1e-3, it flattened after about 150 steps. Temperatures 1.5 and 2 "
        "were chosen for the sweep because T = 2 collapsed clip-0.2 in a probe (the issue asks "
        "for a regime where clipping degrades). The two un-tempered-log-prob and on-policy "
        "conditions run two methods: every method has the same gradient there.",
        "",
    ],
    "staleness": [
        _READING,
        "",
        "Staleness sweep: asynchronous rollouts, each batch sampled k updates before it is "
        "trained, 2 optimizer updates per batch; the trainer and engine are otherwise equal "
        "(fp32, T = 1).",
        "",
    ],
    "ablation": [
        "Ablation of the ESS objective: `ess-noreg` drops the regulariser (1 - ESS) k3(d) and "
        "keeps the capped score-function term; `ess-nocap` weights each token by w instead of "
        "min(w, ESS) and keeps the regulariser. Run in the conditions with the largest "
        "log-ratios.",
        "",
    ],
    "microbatch": [
        "Micro-batch comparison (issue 15), with the library's loss `ess_po.ess_policy_loss`: "
        "each optimizer update's 64 sequences split into calls of 8 or 1 sequences, token-mean "
        "over the update's token count, gradients summed. `call` scope: one ESS per call "
        "(the default, as in the reference implementation); `step` scope: "
        "`ess_po.step_stats` over the whole update, passed to every call as `stats=`. "
        "`whole` = one call per update.",
        "",
    ],
}


def _write(result: dict[str, Any], out: Path, part: str) -> None:
    (out / "results.json").write_text(json.dumps(result, separators=(",", ":")))
    text = report.markdown(result, NOTES[part])
    if part in ("map", "confirm"):
        text += "\n" + "\n".join(selection.markdown(result)) + "\n"
        selection.plot_sensitivity(result, out)
    (out / "results.md").write_text(text)
    report.plot(result, out)


def write_decision(out: Path) -> None:
    """``<out>/decision.md``: the selection rule over both tasks, once both have results."""
    paths = {name: out / name / "results.json" for name in ("map", "confirm")}
    if not all(p.exists() for p in paths.values()):
        return
    results = {name: json.loads(p.read_text()) for name, p in paths.items()}
    partial = [n for n, r in results.items() if r["environment"].get("partial")]
    lines = [
        "# Stale-rollout study: the decision",
        "",
        "Rule: SELECTION_RULE.md (committed before the runs). Tasks: `map` (the learning-rate x "
        "staleness map, results in map/) and `confirm` (the confirmation task, in confirm/).",
        "",
        *([f"**Partial results in {', '.join(partial)}.**", ""] if partial else []),
        *selection.decision(results),
        "",
    ]
    (out / "map" / "decision.md").write_text("\n".join(lines))


def replot(out: Path) -> None:
    """Re-summarise every ``results.json`` under ``out`` and rewrite tables and plots."""
    for path in [
        out / "map" / "results.json",
        out / "confirm" / "results.json",
        out / "results.json",
        out / "microbatch" / "results.json",
        out / "ablation" / "results.json",
        out / "staleness" / "results.json",
    ]:
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        methods = [Method(**v) for v in result["methods"].values()]
        result["summary"] = report.summarize(result["runs"], list(result["conditions"]), methods)
        result["environment"]["replotted"] = datetime.now(timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"
        )
        _write(result, path.parent, result.get("part", "main"))
    write_decision(out)


ABLATION_CONDITIONS = ("temp-2.0", "fp8-stale-4-ep2", "stale-32-ep2")
"""Where the ablation runs: the conditions with the largest log-ratios."""


MAP_CONFIG = StudyConfig(steps=200)
"""Task 1 of the stale-rollout study: the harsh-regime study's task, 200 steps."""
CONFIRM_CONFIG = StudyConfig(
    task="sort", alphabet="abcdefgh", prompt_len=6, hidden_size=48, num_layers=2, steps=200
)
"""Task 2 (confirmation): another task, reward target and model size, fixed before the runs."""


@dataclasses.dataclass
class Part:
    """One part of the study: its cells, its task (``None``: the study's) and its output."""

    name: str
    conditions: dict[str, Condition]
    methods: list[Method]
    subsets: dict[str, Sequence[str]]
    out: Path
    cfg: StudyConfig | None = None


def parts_to_run(args: argparse.Namespace, out: Path) -> list[Part]:
    """The study's parts (``--parts``), with ``--quick`` / ``--conditions`` / ``--methods``."""
    everything = CONDITIONS | STALENESS_SWEEP
    main_conditions, main_methods = CONDITIONS, list(METHODS.values())
    stale_conditions, stale_methods = STALENESS_SWEEP, list(METHODS.values())
    ablation_conditions = ABLATION_CONDITIONS
    p2_conditions, p2_methods = PHASE2_CONDITIONS, list(PHASE2_METHODS.values())
    if args.quick:
        main_conditions = QUICK_CONDITIONS
        main_methods = [METHODS[m] for m in QUICK_METHODS]
        p2_conditions = {"stale-4-ep2": QUICK_CONDITIONS["stale-4-ep2"]}
        p2_methods = [PHASE2_METHODS["ess-mb8-call"], PHASE2_METHODS["ess-mb1-step"]]
        stale_conditions = {k: STALENESS_SWEEP[k] for k in ("stale-4-ep2", "stale-16-ep2")}
        stale_methods = main_methods
        ablation_conditions = ("stale-4-ep2",)
    # An explicit --methods list runs every listed method in every condition.
    subsets = {} if args.methods else SUBSETS
    if args.conditions:
        main_conditions = {k: everything[k] for k in args.conditions}
    if args.methods:
        main_methods = [(METHODS | ABLATION_METHODS)[m] for m in args.methods]
    ablation = [METHODS["ess"], *ABLATION_METHODS.values()]
    map_conditions, map_methods = MAP_CONDITIONS, list(MAP_METHODS.values())
    confirm_conditions = CONFIRM_CONDITIONS
    confirm_methods = [MAP_METHODS[m] for m in CONFIRM_METHODS]
    if args.quick:
        map_conditions = {k: MAP_CONDITIONS[k] for k in ("lr0.0005-k0-ep1", "lr0.005-k16-ep2")}
        confirm_conditions = {k: CONFIRM_CONDITIONS[k] for k in ("lr0.005-k16-ep1",)}
        confirm_methods = confirm_methods[:3]
    table = {
        "map": Part("map", map_conditions, map_methods, MAP_SUBSETS, out / "map", MAP_CONFIG),
        "confirm": Part(
            "confirm",
            confirm_conditions,
            confirm_methods,
            MAP_SUBSETS,
            out / "confirm",
            CONFIRM_CONFIG,
        ),
        "main": Part("main", main_conditions, main_methods, subsets, out),
        "staleness": Part("staleness", stale_conditions, stale_methods, {}, out / "staleness"),
        "ablation": Part(
            "ablation",
            {k: everything[k] for k in ablation_conditions},
            ablation,
            {},
            out / "ablation",
        ),
        "microbatch": Part("microbatch", p2_conditions, p2_methods, {}, out / "microbatch"),
    }
    unknown = sorted(set(args.parts) - set(table))
    if unknown:
        raise ValueError(f"--parts: unknown {unknown}; choose from {list(table)}")
    return [table[name] for name in args.parts]


def run_parts(
    parts: list[Part],
    cfg: StudyConfig,
    seeds: list[int],
    args: argparse.Namespace,
    argv: list[str],
    pool: Any,
    states: dict[int, dict[str, torch.Tensor]],
) -> dict[str, dict[str, Any]]:
    """Run every cell of every part in one pool (costliest first within a seed), then write
    each part's results."""
    env = environment(argv)
    env["workers"] = args.workers
    if args.note:
        env["shared_note"] = args.note
    t0 = time.perf_counter()
    # A cell shared by several parts (e.g. ESS at stale-32-ep2 in the staleness sweep and the
    # ablation) runs once and is reported in each.
    unique: dict[tuple, tuple[StudyConfig, Condition, Method, int]] = {}
    owners: dict[tuple, list[Part]] = {}
    for part in parts:
        pcfg = part.cfg or cfg
        for c, m, s in plan(part.conditions, part.methods, seeds, part.subsets):
            key = (pcfg.task, c.name, m.name, s)
            unique.setdefault(key, (pcfg, c, m, s))
            owners.setdefault(key, []).append(part)
    cells = sorted(
        unique.values(),
        key=lambda x: (x[3], -(x[1].cost * x[0].hidden_size / 64 + 0.5 * (x[2].micro_batch == 1))),
    )
    names = ", ".join(f"{p.name} ({sum(p in o for o in owners.values())})" for p in parts)
    print(f"{len(cells)} runs: {names}; {len(seeds)} seeds", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {p.name: [] for p in parts}
    # Every finished run is appended to runs.jsonl; --resume skips the cells found there.
    log = Path(args.out) / "runs.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if args.resume and log.exists():
        done = {_key(r): r for r in map(json.loads, log.read_text().splitlines()) if r}
        for key, run in done.items():
            for part in owners.get(key, []):
                runs[part.name].append(run)
        print(f"resumed {len(done)} finished runs from {log}", flush=True)
    elif log.exists():
        log.unlink()
    cells = [x for x in cells if (x[0].task, x[1].name, x[2].name, x[3]) not in done]
    jobs = [(pcfg, c, m, s, states[(pcfg, s)]) for pcfg, c, m, s in cells]
    for finished, run in enumerate(pool.imap_unordered(_cell_job, jobs), 1):
        mine = owners[_key(run)]
        for part in mine:
            runs[part.name].append(run)
        with log.open("a") as f:
            f.write(json.dumps(run, separators=(",", ":")) + "\n")
        if args.snapshot_every and finished % args.snapshot_every == 0 and finished < len(jobs):
            env["wall_seconds"] = round(time.perf_counter() - t0, 1)
            env["partial"] = f"{finished + len(done)} of {len(jobs) + len(done)} runs"
            for p in parts:
                if runs[p.name]:
                    _finish(p, cfg, seeds, env, runs[p.name])
        print(
            f"[{finished}/{len(jobs)} {time.perf_counter() - t0:6.0f}s] {mine[0].name:<10} "
            f"{run['condition']:<24} {run['method']:<14} seed {run['seed']}: "
            f"final {run['final_reward']:.3f} peak {max(run['eval_reward']):.3f} "
            f"ess_min {min(run['ess_min']):.3f} dmin {min(run['log_ratio_min']):.1f} "
            f"({run['seconds']:.0f}s)",
            flush=True,
        )
    env["wall_seconds"] = round(time.perf_counter() - t0, 1)
    env.pop("partial", None)
    results = {p.name: _finish(p, cfg, seeds, env, runs[p.name]) for p in parts}
    write_decision(Path(args.out))
    print(f"wrote {', '.join(str(p.out) for p in parts)} in {env['wall_seconds']:.0f}s")
    return results


def _key(run: dict[str, Any]) -> tuple[str, str, str, int]:
    return run["task"], run["condition"], run["method"], run["seed"]


def _finish(
    part: Part,
    cfg: StudyConfig,
    seeds: list[int],
    env: dict[str, Any],
    runs: list[dict[str, Any]],
) -> dict[str, Any]:
    order = list(part.conditions)
    mnames = [m.name for m in part.methods]
    runs = sorted(
        runs, key=lambda r: (order.index(r["condition"]), mnames.index(r["method"]), r["seed"])
    )
    result = {
        "part": part.name,
        "environment": dict(env),
        "config": dataclasses.asdict(part.cfg or cfg),
        "conditions": {k: dataclasses.asdict(v) for k, v in part.conditions.items()},
        "methods": {m.name: dataclasses.asdict(m) for m in part.methods},
        "correction_cap": CORRECTION_CAP,
        "seeds": seeds,
        "summary": report.summarize(runs, order, part.methods),
        "runs": runs,
    }
    part.out.mkdir(parents=True, exist_ok=True)
    _write(result, part.out, part.name)
    return result


_QUICK = {"steps": 10, "eval_every": 5, "eval_prompts": 32, "warm_steps": 8, "prompts_per_step": 4}


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = Path(args.out)
    if args.replot:
        replot(out)
        return {}
    torch.set_num_threads(1)
    cfg = StudyConfig()
    if args.quick:
        cfg = dataclasses.replace(cfg, **_QUICK)
        args.seeds = min(args.seeds, 2)
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    parts = parts_to_run(args, out)
    if args.quick:
        parts = [
            dataclasses.replace(p, cfg=dataclasses.replace(p.cfg, **_QUICK)) if p.cfg else p
            for p in parts
        ]
    elif args.steps is not None:
        parts = [
            dataclasses.replace(p, cfg=dataclasses.replace(p.cfg, steps=args.steps)) if p.cfg else p
            for p in parts
        ]
    seeds = list(range(args.seeds))
    cfgs = list(dict.fromkeys(p.cfg or cfg for p in parts))
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers) as pool:
        states = dict(pool.map(_warm_job, [(c, s) for c in cfgs for s in seeds]))
        return run_parts(parts, cfg, seeds, args, argv, pool, states)
