"""Cost of step scope in verl: actor update time with ``loss_mode=ess`` (one ESS per loss call)
versus ``ess_step`` (one ESS per optimizer step), with the no-grad pre-pass before every optimizer
step and with the free path on the first one.

What is timed: one trainer step's actor update in verl 0.9.1's own code,
``RayPPOTrainer._update_actor`` -> ``ActorRolloutRefWorker.update_actor`` ->
``TrainingWorker.train_mini_batch`` -> the FSDP2 engine (micro-batches, backward, optimizer
step) -> ``ppo_loss`` -> the registered loss. With ``ess_step`` the worker installed by
``enable_step_scope()`` adds the pre-pass (one no-grad forward per micro-batch, then the
statistics all-reduce) before each optimizer step. verl's own ``vanilla`` loss is timed as a
baseline. The batch: 16 sequences of a tiny Qwen2 (4 prompts x 4 responses, prompts <= 4 and
responses <= 6 tokens) = 2 optimizer steps of 8 sequences; micro-batches of ``--micros``
sequences; compute dtype ``--dtypes`` (verl's FSDP mixed precision, fp32 parameters).

CPU workarounds: verl assumes a GPU cluster, so this script runs verl's actor through
:mod:`ess_po.testing.verl_harness` (CPU platform with gloo, eager attention, FSDP2, no
torch.compile, ``trl`` hidden; ``build_worker``, ``rollout_batch``, ``with_known_offsets``,
``update``), the chain the verl tests check. One process (world size 1).

Conditions: ``ess_step`` with known log-ratio offsets (old_log_prob = recomputed minus offsets,
off-policy, ESS < 1): not what the actor produced, so the pre-pass runs before both optimizer
steps. ``ess_step_free``: verl's recomputed old_log_prob used as is, recomputed (untimed) before
every timed update as verl's trainer does: the first optimizer step takes the free path (the
statistics of a zero log-ratio, no forward), the second (after an optimizer step) the pre-pass;
the pre-pass forwards of each update are counted on the engine.

Protocol: one worker per (loss mode, micro-batch size, dtype), all built before timing; the
policy is frozen (lr 0), so every repeat trains the same batch. Repeats are interleaved (the order of conditions reversed every other
repeat) and ``--warmup`` updates per worker are dropped. Reported: median [min, max] over repeats
of the update wall time, and the overhead of ``ess_step`` over ``ess`` as the median (min, max)
of the per-repeat ratios.

    python benchmarks/verl_step_cost.py --quick --output-dir outputs/verl_step_cost
    python benchmarks/verl_step_cost.py --output-dir docs/results/verl_step_scope --repeats 11
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

MODES = ("vanilla", "ess", "ess_step", "ess_step_free")
DTYPES = ("fp32", "bf16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output-dir", default="outputs/verl_step_cost", help="results.md/.json here")
    p.add_argument("--repeats", type=int, default=11, help="timed updates per condition")
    p.add_argument("--warmup", type=int, default=1, help="untimed updates per worker first")
    p.add_argument("--micros", default="1,2,4,8", help="micro-batch sizes (sequences), divide 8")
    p.add_argument("--dtypes", default="fp32,bf16", help=f"compute dtypes: {','.join(DTYPES)}")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="fp32, micro 1 and 8, 3 repeats (smoke)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.dtypes, args.micros = 3, 1, "fp32", "1,8"
    args.micros = [int(m) for m in args.micros.split(",")]
    args.dtypes = args.dtypes.split(",")
    if any(m < 1 or 8 % m for m in args.micros):
        p.error(f"--micros must divide the mini-batch of 8 sequences, got {args.micros}")
    if set(args.dtypes) - set(DTYPES):
        p.error(f"--dtypes takes {DTYPES}, got {args.dtypes}")
    if args.repeats < 1 or args.warmup < 0:
        p.error(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats}, {args.warmup}")
    return args


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = "python " + " ".join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ess_po.testing import verl_harness as vh

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    tmp = Path(tempfile.mkdtemp(prefix="verl_step_cost_"))
    vh.setup(tmp / "init")  # before verl's platform is first used
    import torch
    import transformers
    import verl

    from ess_po.integrations.verl import enable_step_scope

    torch.set_num_threads(args.threads)
    tokenizer = vh.save_model(tmp / "model", hidden_size=args.hidden_size, num_layers=args.layers)
    enable_step_scope()
    conditions = [(d, m, mode) for d in args.dtypes for m in args.micros for mode in MODES]
    hosts, offsets = {}, None

    def batch_for(condition: tuple) -> Any:
        """The batch of the next update: for ``ess_step_free`` verl's recompute, just before."""
        host, batch = hosts[condition]
        if condition[2] != "ess_step_free":
            return batch
        return batch.union(vh.old_log_prob(host, batch))

    for dtype, micro, mode in conditions:
        host, _ = vh.build_worker(
            tmp / "model",
            "ess_step" if mode == "ess_step_free" else mode,
            lr=0.0,
            micro=micro,
            extra=[f"+actor_rollout_ref.actor.fsdp_config.mixed_precision={{param_dtype:{dtype}}}"],
        )
        if mode == "ess_step_free":
            hosts[dtype, micro, mode] = (host, vh.rollout_batch(tokenizer))
        else:
            batch, offsets = vh.with_known_offsets(host, vh.rollout_batch(tokenizer), offsets)
            hosts[dtype, micro, mode] = (host, batch)
        for _ in range(args.warmup):
            vh.update(host, batch_for((dtype, micro, mode)))

    seconds: dict[tuple, list[float]] = {c: [] for c in conditions}
    recompute: dict[tuple, list[float]] = {(d, m): [] for d in args.dtypes for m in args.micros}
    # The free path's recompute also records per-sequence digests: timed separately.
    recompute_free: dict[tuple, list[float]] = {
        (d, m): [] for d in args.dtypes for m in args.micros
    }
    logged_ess: dict[tuple, float] = {}
    logged_free: dict[tuple, float] = {}
    prepass_forwards: dict[tuple, list[int]] = {c: [] for c in conditions}
    for rep in range(args.repeats):
        for condition in conditions if rep % 2 == 0 else conditions[::-1]:
            start = time.perf_counter()
            host, batch = hosts[condition][0], batch_for(condition)
            if condition[2] == "ess_step_free":
                recompute_free[condition[:2]].append(time.perf_counter() - start)
            forwards = host.forward_only_calls
            start = time.perf_counter()
            metrics = vh.update(host, batch)
            seconds[condition].append(time.perf_counter() - start)
            prepass_forwards[condition].append(host.forward_only_calls - forwards)
            logged_ess[condition] = metrics.get("actor/ess", float("nan"))
            logged_free[condition] = metrics.get("actor/ess_step_free", float("nan"))
            if condition[2] == "ess":  # verl's old_log_prob recompute, the same for every mode
                start = time.perf_counter()
                vh.old_log_prob(host, batch)
                recompute[condition[:2]].append(time.perf_counter() - start)
        print(f"repeat {rep + 1}/{args.repeats} done", flush=True)

    # ESS of each optimizer step's 8 sequences from the known log-ratios (float64), for the
    # logged values to be read against.
    w = offsets.double().exp()
    mask = batch.batch["response_mask"].bool()
    step_ess = []
    for rows_of_step in (slice(0, 8), slice(8, 16)):
        x = w[rows_of_step][mask[rows_of_step]]
        step_ess.append(float(x.sum() ** 2 / (x.numel() * (x**2).sum())))
    rows = []
    for dtype in args.dtypes:
        for micro in args.micros:
            t = {mode: seconds[dtype, micro, mode] for mode in MODES}
            ratio = [s / e for s, e in zip(t["ess_step"], t["ess"], strict=True)]
            free_ratio = [s / e for s, e in zip(t["ess_step_free"], t["ess"], strict=True)]
            r = recompute[dtype, micro]
            ratio_with_recompute = [
                (c + s) / (c + e) for c, s, e in zip(r, t["ess_step"], t["ess"], strict=True)
            ]
            rf = recompute_free[dtype, micro]
            free_with_recompute = [
                (cf + s) / (c + e)
                for cf, c, s, e in zip(rf, r, t["ess_step_free"], t["ess"], strict=True)
            ]
            rows.append(
                {
                    "dtype": dtype,
                    "micro": micro,
                    "calls_per_optimizer_step": 8 // micro,
                    "update_seconds": {mode: summary(v) for mode, v in t.items()},
                    "per_repeat_seconds": t,
                    "ess_step_over_ess": {**summary(ratio), "per_repeat": ratio},
                    "ess_step_free_over_ess": {**summary(free_ratio), "per_repeat": free_ratio},
                    "prepass_forwards_per_update": {
                        m: sorted(set(prepass_forwards[dtype, micro, m])) for m in MODES[2:]
                    },
                    "logged_actor_ess_step_free": {
                        m: logged_free[dtype, micro, m] for m in MODES[2:]
                    },
                    "old_log_prob_seconds": summary(r),
                    "old_log_prob_seconds_free_worker": summary(rf),
                    "ess_step_free_over_ess_with_recompute": {
                        **summary(free_with_recompute),
                        "per_repeat": free_with_recompute,
                    },
                    "ess_step_over_ess_with_recompute": {
                        **summary(ratio_with_recompute),
                        "per_repeat": ratio_with_recompute,
                    },
                    "logged_actor_ess": {m: logged_ess[dtype, micro, m] for m in MODES[1:]},
                }
            )
    result = {
        "rows": rows,
        "step_ess": step_ess,
        "settings": {k: v for k, v in vars(args).items() if k != "output_dir"},
        "environment": {
            "verl": verl.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "device": "cpu",
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": command,
            "load_average_at_start": load_start,
            "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    s, e = result["settings"], result["environment"]
    load = [e[k] for k in ("load_average_at_start", "load_average_at_end")]
    lines = [
        "# verl step scope: actor update time, `ess` (per call) vs `ess_step` (pre-pass, free path)",
        "",
        f"Command: `{e['command']}`  ",
        f"Date: {e['date']}; verl {e['verl']}, torch {e['torch']}, transformers "
        f"{e['transformers']}, python {e['python']}; {e['device']} ({e['cpu']}, {e['cpu_count']} "
        f"CPUs, {e['torch_threads']} torch thread(s))"
        + (
            f"; load average {load[0][0]:.1f} at the start, {load[1][0]:.1f} at the end."
            if all(load)
            else "."
        ),
        "",
        "Setup: verl 0.9.1's FSDP2 actor on the CPU in one process (workarounds of "
        "`ess_po.testing.verl_harness`), tiny Qwen2 "
        f"(hidden {s['hidden_size']}, {s['layers']} layers); one actor update = "
        "`RayPPOTrainer._update_actor` on 16 sequences = 2 optimizer steps of 8; policy frozen "
        "(lr 0). `ess_step`: old_log_prob = recomputed minus known log-ratio offsets, so the "
        "pre-pass runs before both optimizer steps; `ess_step (free)`: verl's recomputed "
        "old_log_prob as is, recomputed before each update (timed apart: it also records the free "
        "path's per-sequence digests), so the first optimizer step "
        "takes the free path (no forward) and the second the pre-pass. "
        f"{s['repeats']} interleaved repeats after {s['warmup']} warm-up update(s) per worker.",
        "",
        "Update time (s), median over repeats [min, max]; `ess_step` / `ess` and `free` / `ess`: "
        "median (min, max) of the per-repeat ratio; *pre-pass fwd*: pre-pass forwards per update "
        "(`ess_step` / free), counted on the engine; *old_log_prob*: verl's recompute (4 sequences "
        "per forward) on the `ess` worker / on the free-path worker (with its digests); *with "
        "recompute*: `ess_step` / `ess` and free / `ess` with each worker's recompute added, the "
        "actor work of one trainer step. *actor/ess*: the mean over calls that verl logged in the last "
        "update (`ess` / `ess_step` / free; free: step 1 on-policy, ESS 1); the two optimizer steps' ESS, from the known log-ratios in "
        f"float64: {result['step_ess'][0]:.4f} and {result['step_ess'][1]:.4f}.",
        "",
        "| compute | micro-batch | calls / step | `vanilla` | `ess` | `ess_step` | `ess_step` (free) "
        "| old_log_prob |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ratios = [
        "",
        "Ratios (median (min, max) over repeats), pre-pass forwards and the logged ESS:",
        "",
        "| compute | micro-batch | `ess_step` / `ess` | free / `ess` | with recompute: `ess_step` "
        "| with recompute: free | pre-pass fwd | actor/ess |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ratio(x: dict) -> str:
        return f"{x['median']:.2f} ({x['min']:.2f}, {x['max']:.2f})"

    for row in result["rows"]:
        t, c = row["update_seconds"], row["old_log_prob_seconds"]
        cf = row["old_log_prob_seconds_free_worker"]
        fwd = row["prepass_forwards_per_update"]
        ess = row["logged_actor_ess"]
        cells = [f"{t[m]['median']:.3f} [{t[m]['min']:.3f}, {t[m]['max']:.3f}]" for m in MODES]
        head = f"| {row['dtype']} | {row['micro']} | "
        lines.append(
            head
            + f"{row['calls_per_optimizer_step']} | "
            + " | ".join(cells)
            + f" | {c['median']:.3f} / {cf['median']:.3f} |"
        )
        ratios.append(
            head
            + " | ".join(
                ratio(row[k])
                for k in (
                    "ess_step_over_ess",
                    "ess_step_free_over_ess",
                    "ess_step_over_ess_with_recompute",
                    "ess_step_free_over_ess_with_recompute",
                )
            )
            + f" | {'/'.join(str(fwd[m]) for m in MODES[2:])}"
            + f" | {ess['ess']:.4f} / {ess['ess_step']:.4f} / {ess['ess_step_free']:.4f} |"
        )
    lines += ratios
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
