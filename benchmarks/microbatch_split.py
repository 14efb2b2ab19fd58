"""One optimizer step split into micro-batches: per-call ESS vs one ESS over the step (issue 15).

The same step of 64 sequences (lengths 1..512, float32) is split into ``calls x sequences``
micro-batches: 1x64, 64x1, 32x2, 8x8, 2x32. Log-ratios ``d = logp_new - logp_old`` are
N(0, 0.02^2) noise plus, on 0.2% of the valid tokens, an N(0, 1.5^2) offset (the rare tokens a
mismatched sampler produces). Advantages are N(0, 1) per sequence. Every call uses
``loss_agg_mode="token-mean"`` with the step's total token count as ``normalizer``, and the
gradients with respect to ``logp_new`` are summed over the calls, as gradient accumulation does.

* per-call scope (the default, as the authors' reference implementation): each call computes
  its own ESS from its own tokens;
* step scope: ``stats=step_stats(...)`` over all micro-batches of the step, handed to every call.

Reference: one call over all 64 sequences (one ESS over the step). Reported per split: the
ESS of the calls (min / median / max; mean over seeds) and the relative gradient difference
``||g_split - g_ref|| / ||g_ref||`` (Frobenius norm over the (64, 512) gradient; mean ± std over
seeds). It measures and asserts nothing.

    python benchmarks/microbatch_split.py --out docs/results/step_scope

Results go to ``--out`` only (default: a folder in the system's temporary directory). The report
records the command, the date, the versions and the device. Runs in a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from loss_cost import environment

import ess_po
from ess_po import ess_policy_loss, step_stats

SPLITS = ((1, 64), (64, 1), (32, 2), (8, 8), (2, 32))  # (calls, sequences per call)


def make_step(seed: int, batch: int, max_len: int, noise: float, rare: float, rare_std: float):
    """``(logp_new, logp_old, advantages, mask)`` of one optimizer step, float32."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (batch,), generator=g)
    mask = torch.arange(max_len)[None, :] < lengths[:, None]
    logp_old = -torch.rand(batch, max_len, generator=g) * 4.0 - 0.01
    d = noise * torch.randn(batch, max_len, generator=g)
    offsets = rare_std * torch.randn(batch, max_len, generator=g)
    d = torch.where(torch.rand(batch, max_len, generator=g) < rare, d + offsets, d)
    advantages = torch.randn(batch, generator=g)
    return logp_old + d, logp_old, advantages, mask


def accumulate(step, calls: int, *, step_scope: bool) -> tuple[torch.Tensor, list[float]]:
    """Summed gradient w.r.t. ``logp_new`` over ``calls`` equal micro-batches, and each call's ESS."""
    logp_new, logp_old, adv, mask = step
    size = logp_new.shape[0] // calls
    parts = [slice(i * size, (i + 1) * size) for i in range(calls)]
    normalizer = mask.sum()
    stats = None
    if step_scope:
        stats = step_stats([((logp_new - logp_old)[p], mask[p]) for p in parts], sync=False)
    leaf = logp_new.clone().requires_grad_(True)
    ess = []
    for p in parts:
        out = ess_policy_loss(
            leaf[p], logp_old[p], adv[p], mask[p], normalizer=normalizer, stats=stats
        )
        out.loss.backward()
        ess.append(float(out.ess))
    return leaf.grad, ess


def run(args: argparse.Namespace) -> dict:
    rows: dict[str, dict] = {}
    for calls, size in SPLITS:
        per = {"ess_min": [], "ess_median": [], "ess_max": [], "grad_diff": []}
        step = {"ess": [], "grad_diff": []}
        for seed in range(args.seeds):
            data = make_step(seed, args.batch, args.max_len, args.noise, args.rare, args.rare_std)
            ref, _ = accumulate(data, 1, step_scope=False)
            grad, ess = accumulate(data, calls, step_scope=False)
            per["ess_min"].append(min(ess))
            per["ess_median"].append(statistics.median(ess))
            per["ess_max"].append(max(ess))
            per["grad_diff"].append(float((grad - ref).norm() / ref.norm()))
            grad, ess = accumulate(data, calls, step_scope=True)
            step["ess"].append(ess[0])
            step["grad_diff"].append(float((grad - ref).norm() / ref.norm()))
        rows[f"{calls}x{size}"] = {"calls": calls, "sequences": size, "per_call": per, "step": step}
    return {
        "environment": {**environment("cpu"), "ess_po": ess_po.__version__},
        "setup": {
            "batch": args.batch,
            "max_len": args.max_len,
            "noise_std": args.noise,
            "rare_fraction": args.rare,
            "rare_std": args.rare_std,
            "seeds": args.seeds,
            "dtype": "float32",
            "loss_agg_mode": "token-mean",
            "normalizer": "the step's valid token count",
            "grad_diff": "||g_split - g_one_call|| / ||g_one_call|| (Frobenius, w.r.t. logp_new)",
        },
        "splits": rows,
    }


def _pm(values: list[float], fmt: str) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{fmt}} ± {sd:{fmt}}"


def markdown(report: dict) -> str:
    env, setup = report["environment"], report["setup"]
    lines = [
        "# One optimizer step split into micro-batches: per-call vs step-scope ESS",
        "",
        f"Command: `{env['command']}`  ",
        f"Date: {env['date']}; device: {env['device']} ({env['processor']}, "
        f"{env['cpu_count']} CPUs, {env['threads']} torch threads); python {env['python']}, "
        f"torch {env['torch']}, ess-po {env['ess_po']}.",
        "",
        f"Setup: {setup['batch']} sequences, lengths uniform in 1..{setup['max_len']}, float32; "
        f"log-ratio N(0, {setup['noise_std']}²) plus, on {setup['rare_fraction']:.1%} of the "
        f"tokens, an N(0, {setup['rare_std']}²) offset; advantages N(0, 1) per sequence; "
        "token-mean with the step's token count as normaliser; gradients w.r.t. logp_new summed "
        f"over the calls. {setup['seeds']} seeds: ESS columns are means over seeds, gradient "
        "differences mean ± std over seeds, relative to one call over the whole step "
        "(Frobenius norm).",
        "",
        "| split | per call: ESS min / median / max | per call: gradient vs one ESS over the step "
        "| step scope: ESS | step scope: gradient difference |",
        "|---|---|---|---|---|",
    ]
    for row in report["splits"].values():
        per, step = row["per_call"], row["step"]
        mean = {k: statistics.mean(v) for k, v in per.items()}
        split = f"{row['calls']} call{'s' if row['calls'] > 1 else ''} of {row['sequences']}"
        if row["calls"] == 1:
            ess, diff = f"{mean['ess_min']:.3f}", "(reference)"
        else:
            ess = f"{mean['ess_min']:.3f} / {mean['ess_median']:.3f} / {mean['ess_max']:.3f}"
            diff = f"{_pm([100 * x for x in per['grad_diff']], '.1f')} %"
        lines.append(
            f"| {split} | {ess} | {diff} | {_pm(step['ess'], '.3f')} | "
            f"{max(step['grad_diff']):.1e} (largest) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--batch", type=int, default=64, help="sequences per optimizer step")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--noise", type=float, default=0.02, help="std of the log-ratio noise")
    p.add_argument("--rare", type=float, default=0.002, help="share of tokens with an offset")
    p.add_argument("--rare-std", type=float, default=1.5, help="std of the rare offsets")
    p.add_argument(
        "--out",
        type=Path,
        default=Path(tempfile.gettempdir()) / "ess_po_microbatch_split",
        help="output folder (default: %(default)s); the committed results use "
        "docs/results/step_scope",
    )
    args = p.parse_args(argv)
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "microbatch_split.json").write_text(json.dumps(report, indent=2))
    (args.out / "microbatch_split.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {args.out / 'microbatch_split'}.json and .md")


if __name__ == "__main__":
    main()
