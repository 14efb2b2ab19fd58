"""What the ESS objective costs per step, next to the losses it replaces.

Forward, backward and forward+backward time and the memory saved for backward of:

* ``reinforce``  -(A * logp * mask).sum() / n: the floor (no ratios at all);
* ``clipped``    the PPO/GRPO clipped surrogate as TRL's GRPOTrainer computes it (eps = 0.2);
* ``cispo``      CISPO's capped score-function loss (sg(min(w, 1 + eps_high)) * A * logp);
* ``ess``        ``ess_po.ess_policy_loss`` (plain autograd, with its masking guarantees and
                 diagnostics: what a user runs);
* ``ess-direct`` the bare formula written directly with autograd, without sanitising masked
                 positions or diagnostics (what those cost).

All methods see identical tensors. Repetitions are interleaved (each round runs every method
once, in rotating order) so machine noise hits them alike; the report gives the median and the
interquartile range, ratios to ``clipped`` and ``reinforce`` of the same run, the device and the
versions. Timing lives here, never in unit tests.

    python benchmarks/loss_cost.py --quick            # (64, 4096) float32, eager + compiled
    python benchmarks/loss_cost.py                    # the full grid (8x1024 .. 256x8192)
    python benchmarks/loss_cost.py --device cuda      # same script on a GPU

Results go to ``--out`` only (default: a folder in the system's temporary directory); the
committed ones were written with ``--out docs/results/loss_cost``. The report records the
command, the date, the versions, the device and the machine's load average before and after the
run (other processes share the CPU on a busy machine; the interleaving spreads their effect over
all methods alike).
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
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from baselines import cispo, clipped, reinforce

from ess_po import ess_policy_loss

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
FULL_SIZES = [(8, 1024), (64, 1024), (64, 4096), (256, 4096), (256, 8192)]


def ess(lp, old, adv, mask):
    return ess_policy_loss(lp, old, adv, mask).loss


def ess_direct(lp, old, adv, mask):
    """The formula as one would first write it: autograd through every step."""
    lp32, old32 = lp.float(), old.float()
    m = mask.to(torch.float32)
    d = torch.where(mask, lp32 - old32, 0.0)
    w = torch.exp(d).detach() * m
    n = m.sum().clamp(min=1)
    ess_val = (w.sum() ** 2 / (n * (w * w).sum())).detach()
    rho = torch.minimum(w, ess_val)
    k3 = d + torch.exp(-d) - 1
    per_token = -rho * adv.float().unsqueeze(-1) * lp32 + (1 - ess_val) * k3
    return (per_token * m).sum() / n


METHODS: dict[str, LossFn] = {
    "reinforce": reinforce,
    "clipped": clipped,
    "cispo": cispo,
    "ess": ess,
    "ess-direct": ess_direct,
}


def make_inputs(B: int, T: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 4
    old = lp + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    to = dict(device=device)
    return (
        lp.to(dtype=dtype, **to).requires_grad_(True),
        old.to(dtype=dtype, **to),
        adv.to(dtype=torch.float32, **to),
        mask.to(**to),
    )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def saved_bytes(fn: LossFn, inputs) -> int:
    """Bytes of distinct tensors autograd keeps for backward (device-independent memory)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(seen.values())


def measure(fns: dict[str, LossFn], inputs, device: str, reps: int, warmup: int) -> dict:
    lp = inputs[0]
    times = {name: {"forward": [], "backward": [], "full": []} for name in fns}
    peak = {name: 0 for name in fns}
    names = list(fns)
    for r in range(warmup + reps):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no fixed position
        for name in order:
            lp.grad = None
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            t0 = time.perf_counter()
            loss = fns[name](*inputs)
            _sync(device)
            t1 = time.perf_counter()
            loss.backward()
            _sync(device)
            t2 = time.perf_counter()
            if device.startswith("cuda"):
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated())
            if r >= warmup:
                times[name]["forward"].append(t1 - t0)
                times[name]["backward"].append(t2 - t1)
                times[name]["full"].append(t2 - t0)
    out = {}
    for name in fns:
        row = {}
        for phase, xs in times[name].items():
            q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
            row[phase] = {"median_ms": 1e3 * statistics.median(xs), "iqr_ms": 1e3 * (q[2] - q[0])}
        row["cuda_peak_bytes"] = peak[name] if device.startswith("cuda") else None
        out[name] = row
    return out


def _load() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def environment(device: str) -> dict:
    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "device": device,
        "threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return env


def run(args: argparse.Namespace) -> dict:
    sizes = [(64, 4096)] if args.quick else FULL_SIZES
    dtypes = ["float32"] if args.quick else ["float32", "bfloat16"]
    modes = ["eager", "compiled"] if not args.no_compile else ["eager"]
    load_before = _load()
    results = []
    for B, T in sizes:
        for dtype_name in dtypes:
            inputs = make_inputs(B, T, getattr(torch, dtype_name), args.device)
            for mode in modes:
                fns = dict(METHODS)
                if mode == "compiled":
                    torch._dynamo.reset()
                    fns = {k: torch.compile(v, dynamic=False) for k, v in fns.items()}
                t0 = time.perf_counter()
                stats = measure(fns, inputs, args.device, args.reps, args.warmup)
                mem = {k: saved_bytes(METHODS[k], inputs) for k in METHODS}
                for k in stats:
                    stats[k]["saved_for_backward_bytes"] = mem[k]
                results.append(
                    {"B": B, "T": T, "dtype": dtype_name, "mode": mode, "methods": stats}
                )
                full = {k: v["full"]["median_ms"] for k, v in stats.items()}
                print(
                    f"({B:4d},{T:5d}) {dtype_name:8s} {mode:8s} "
                    + "  ".join(f"{k} {v:7.3f}ms" for k, v in full.items())
                    + f"   [{time.perf_counter() - t0:.0f}s]",
                    flush=True,
                )
    env = environment(args.device)
    env["load_average_before"] = load_before
    env["load_average_after"] = _load()
    return {"environment": env, "reps": args.reps, "results": results}


_busy_note = (
    ": other processes were running, so absolute times are inflated and noisy; the interleaved "
    "repetitions spread that over all methods alike."
)


def _busy(env: dict) -> bool:
    """More runnable processes than CPUs (1-minute load average) at the start or the end."""
    loads = [(env.get(k) or [0.0])[0] for k in ("load_average_before", "load_average_after")]
    return max(loads) > (env.get("cpu_count") or 1)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# Cost of the loss: forward + backward",
        "",
        f"{env['date']}, torch {env['torch']}, Python {env['python']}, device {env['device']}"
        f" ({env.get('gpu', env['processor'])}, {env['threads']} threads), "
        f"{report['reps']} interleaved repetitions; median (IQR) in ms.",
        "",
        f"Command: `{env.get('command', '?')}`. Load average (1, 5, 15 min) before "
        f"{env.get('load_average_before')}, after {env.get('load_average_after')} on "
        f"{env.get('cpu_count')} CPUs" + (_busy_note if _busy(env) else "."),
        "",
        "| B x T | dtype | mode | method | forward | backward | fwd+bwd | / clipped | / reinforce "
        "| saved for bwd |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        m = r["methods"]
        base_c = m["clipped"]["full"]["median_ms"]
        base_r = m["reinforce"]["full"]["median_ms"]
        for name, row in m.items():
            f, b, full = row["forward"], row["backward"], row["full"]
            lines.append(
                f"| {r['B']}x{r['T']} | {r['dtype']} | {r['mode']} | {name} "
                f"| {f['median_ms']:.3f} ({f['iqr_ms']:.3f}) "
                f"| {b['median_ms']:.3f} ({b['iqr_ms']:.3f}) "
                f"| {full['median_ms']:.3f} ({full['iqr_ms']:.3f}) "
                f"| {full['median_ms'] / base_c:.2f} | {full['median_ms'] / base_r:.2f} "
                f"| {row['saved_for_backward_bytes'] / 2**20:.1f} MiB |"
            )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Forward+backward time relative to the clipped surrogate, per size, eager and compiled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    modes = sorted({r["mode"] for r in results}, key=["eager", "compiled"].index)
    dtypes = sorted({r["dtype"] for r in results})
    fig, axes = plt.subplots(
        len(dtypes), len(modes), figsize=(5.5 * len(modes), 3.6 * len(dtypes)), squeeze=False
    )
    for i, dtype in enumerate(dtypes):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            rows = [r for r in results if r["dtype"] == dtype and r["mode"] == mode]
            labels = [f"{r['B']}x{r['T']}" for r in rows]
            width = 0.8 / len(METHODS)
            for k, name in enumerate(METHODS):
                ratios = [
                    r["methods"][name]["full"]["median_ms"]
                    / r["methods"]["clipped"]["full"]["median_ms"]
                    for r in rows
                ]
                xs = [x + (k - len(METHODS) / 2 + 0.5) * width for x in range(len(rows))]
                ax.bar(xs, ratios, width, label=name)
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_xticks(range(len(rows)), labels)
            ax.set_title(f"{mode}, {dtype}")
            ax.set_ylabel("fwd+bwd time / clipped")
    axes[0][0].legend(fontsize=8)
    env = report["environment"]
    fig.suptitle(
        f"Cost of the loss (torch {env['torch']}, {env['device']}, {env['threads']} threads)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one size, float32 (CI smoke)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per method")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument(
        "--out",
        type=Path,
        default=Path(tempfile.gettempdir()) / "ess_po_loss_cost",
        help="output folder (default: %(default)s); the committed results use "
        "docs/results/loss_cost",
    )
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 30 if args.quick else 50
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda requested but torch.cuda.is_available() is False")
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "loss_cost_quick" if args.quick else "loss_cost"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"{stem}.md").write_text(markdown(report))
    plot(report, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json, .md and .png")


if __name__ == "__main__":
    main()
