"""What the ESS objective costs per step, next to the losses it replaces (issue 24's targets).

Forward, backward and forward+backward time and the memory saved for backward of:

* ``reinforce``      -(A * logp * mask).sum() / n: the floor (no ratios at all);
* ``clipped``        the PPO/GRPO clipped surrogate as TRL's GRPOTrainer computes it (eps = 0.2);
* ``cispo``          CISPO's capped score-function loss (sg(min(w, 1 + eps_high)) * A * logp);
* ``ess``            ``ess_po.ess_policy_loss`` as shipped (the fused passes of
                     ``ess_po/_fused.py``, with every masking guarantee and the diagnostics);
* ``ess-reference``  the same call on the plain-autograd reference path
                     (``ess_po._fused.ENABLED = False``);
* ``ess-direct``     the bare formula written directly with autograd, without sanitising masked
                     positions or diagnostics (what those cost);
* ``floor``          REINFORCE plus the two transcendental functions per token any ESS loss
                     needs (the statistics' exp and the regulariser's expm1), summed: the floor
                     under the ESS loss, to read the compiled target against;
* ``step-stats``     ``ess_po.step_stats`` of the batch (the statistics pre-pass of the step
                     scope, no gradient; plain torch), and ``step-stats-fused`` the same
                     statistics from the fused loss's passes (not shipped: no faster).

Masks come as ``bool``, 0/1 ``float`` and ``int`` (int64, like TRL's ``completion_mask``). All
methods see identical tensors. Repetitions are interleaved (each round runs every method once,
in rotating order) so machine noise hits them alike; the report gives the median and the
interquartile range, the ratios of issue 24's targets (eager ``ess`` / eager ``clipped``,
compiled ``ess`` / compiled ``reinforce``) from the same run, the device and the versions.
``--profile`` adds where the time goes: the eager operators of one call of each loss, from
``torch.profiler``, by self time, and the compiled kernels (one per fused pass over the tokens)
of ``ess`` and ``reinforce``, from Inductor's kernel profiling. Every eager run also measures
the fixed cost of a call, at (1, 8) tokens, which splits the smallest size's time into a fixed
part and a per-token part. Timing lives here, never in unit tests; nothing is asserted.

    python benchmarks/loss_cost.py --quick            # (64, 4096) float32, bool/float masks
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

from ess_po import _fused, ess_policy_loss, step_stats

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
FULL_SIZES = [(8, 1024), (64, 1024), (64, 4096), (256, 4096), (256, 8192)]
MASKS = ["bool", "float", "int"]


def ess(lp, old, adv, mask):
    return ess_policy_loss(lp, old, adv, mask).loss


def _ess_reference(lp, old, adv, mask):  # its own code object: its own compile cache
    return ess_policy_loss(lp, old, adv, mask).loss


def _stats(lp, old, adv, mask):
    return step_stats([(lp.detach() - old, mask)]).log_s1


def _stats_fused(lp, old, adv, mask):
    """The same statistics from the fused loss's passes (``ess_po._fused.fused_stats``)."""
    lr = lp.detach().float() - old.float()
    m = _fused._Mask(mask, lr.dtype, torch.compiler.is_compiling())
    return _fused.fused_stats(m.keep(lr), m, None, need_low=False)[0].log_space().log_s1


def on_reference(fn: LossFn) -> LossFn:
    """``fn`` with the reference path switched on for the call (outside any compiled region)."""

    def run(*args):
        _fused.ENABLED = False
        try:
            return fn(*args)
        finally:
            _fused.ENABLED = True

    return run


def ess_direct(lp, old, adv, mask):
    """The formula as one would first write it: autograd through every step."""
    lp32, old32 = lp.float(), old.float()
    valid = mask if mask.dtype == torch.bool else mask != 0
    m = valid.to(torch.float32)
    d = torch.where(valid, lp32 - old32, 0.0)
    w = torch.exp(d).detach() * m
    n = m.sum().clamp(min=1)
    ess_val = (w.sum() ** 2 / (n * (w * w).sum())).detach()
    rho = torch.minimum(w, ess_val)
    k3 = d + torch.exp(-d) - 1
    per_token = -rho * adv.float().unsqueeze(-1) * lp32 + (1 - ess_val) * k3
    return (per_token * m).sum() / n


def floor(lp, old, adv, mask):
    """REINFORCE + exp(d) and expm1(-d) of every token (no gradient through them)."""
    with torch.no_grad():
        d = lp.float() - old.float()
        m = mask.to(torch.float32)
        both = (torch.exp(d) * m).sum() + (torch.expm1(-d) * m).sum()
    return reinforce(lp, old, adv, mask) + 0.0 * both


METHODS: dict[str, LossFn] = {
    "reinforce": reinforce,
    "clipped": clipped,
    "cispo": cispo,
    "ess": ess,
    "ess-reference": _ess_reference,
    "ess-direct": ess_direct,
    "floor": floor,
    "step-stats": _stats,
    "step-stats-fused": _stats_fused,
}
REFERENCE = {"ess-reference"}


def make_inputs(B: int, T: int, dtype: torch.dtype, device: str, mask_kind: str, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    lp = -torch.rand(B, T, generator=g) * 4
    old = lp + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    mask = {"bool": mask, "float": mask.float(), "int": mask.long()}[mask_kind]
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
    """Bytes of distinct tensors autograd keeps for backward beyond the inputs."""
    seen: dict[int, int] = {}
    own = {t.untyped_storage().data_ptr() for t in inputs}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
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
            if loss.requires_grad:
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


def _profiled(fn: LossFn, inputs, reps: int) -> dict:
    """``torch.profiler`` entries of one forward + backward of ``fn`` by self CPU time (us
    per call, averaged over ``reps`` calls after 3 untimed ones), and their total."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(3):
        loss = fn(*inputs)
        if loss.requires_grad:
            loss.backward()
        inputs[0].grad = None
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            loss = fn(*inputs)
            if loss.requires_grad:
                loss.backward()
            inputs[0].grad = None
    rows = [
        {"op": ev.key, "calls": ev.count / reps, "self_us": ev.self_cpu_time_total / reps}
        for ev in prof.key_averages()
        if ev.self_cpu_time_total > 0
    ]
    rows.sort(key=lambda r: -r["self_us"])
    return {"total_us": sum(r["self_us"] for r in rows), "ops": rows}


def profile(inputs, methods: list[str], reps: int) -> dict:
    """Eager operators of one forward + backward of each method, by self CPU time (us per
    call, averaged over ``reps`` calls): where the time goes, pass by pass."""
    return {
        name: _profiled(on_reference(METHODS[name]) if name in REFERENCE else METHODS[name],
                        inputs, reps)
        for name in methods
    }  # fmt: skip


def profile_compiled(inputs, methods: list[str], reps: int) -> dict:
    """Compiled kernels of one forward + backward of each method (us of self time per call,
    averaged over ``reps`` calls), with Inductor's per-kernel profiling on: on the CPU each
    ``cpp_fused_*`` kernel is a fused loop nest over the tokens."""
    import torch._inductor.config as inductor_config

    out = {}
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        for name in methods:
            torch._dynamo.reset()
            out[name] = _profiled(torch.compile(METHODS[name], dynamic=False), inputs, reps)
    torch._dynamo.reset()
    return out


FIXED_METHODS = ["ess", "clipped", "reinforce"]


def fixed_cost(args: argparse.Namespace) -> list[dict]:
    """Eager forward + backward at (1, 8) tokens, per dtype and mask: the cost of a call that is
    not proportional to its tokens (operator dispatch, Python, autograd, scalar arithmetic)."""
    rows = []
    for dtype_name in args.dtypes:
        for mask_kind in args.masks:
            inputs = make_inputs(1, 8, getattr(torch, dtype_name), args.device, mask_kind)
            fns = {k: METHODS[k] for k in FIXED_METHODS}
            stats = measure(fns, inputs, args.device, max(200, 4 * args.reps), 20)
            rows.append({"dtype": dtype_name, "mask": mask_kind, "methods": stats})
            print(
                f"(   1,    8) {dtype_name:8s} {mask_kind:5s} eager    "
                + "  ".join(f"{k} {v['full']['median_ms']:.3f}" for k, v in stats.items()),
                flush=True,
            )
    return rows


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


def reps_for(B: int, T: int, reps: int) -> int:
    """Fewer repetitions on the large sizes (their spread is smaller): full up to 2**19
    tokens, then proportionally fewer, at least 10."""
    return max(min(10, reps), round(reps * min(1.0, 2**19 / (B * T))))


def run(args: argparse.Namespace) -> dict:
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes]
    modes = [m for m in args.modes if not (args.no_compile and m == "compiled")]
    load_before = _load()
    results = []
    for B, T in sizes:
        for dtype_name in args.dtypes:
            for mask_kind in args.masks:
                inputs = make_inputs(B, T, getattr(torch, dtype_name), args.device, mask_kind)
                reps = reps_for(B, T, args.reps)
                for mode in modes:
                    names = list(METHODS) if mode == "eager" else list(args.compiled_methods)
                    if mode == "compiled" and mask_kind not in args.compiled_masks:
                        continue
                    fns = {k: METHODS[k] for k in names}
                    t0 = time.perf_counter()
                    if mode == "compiled":
                        torch._dynamo.reset()
                        fns = {k: torch.compile(v, dynamic=False) for k, v in fns.items()}
                    fns = {k: on_reference(v) if k in REFERENCE else v for k, v in fns.items()}
                    stats = measure(fns, inputs, args.device, reps, args.warmup)
                    for k in stats:
                        fn = on_reference(METHODS[k]) if k in REFERENCE else METHODS[k]
                        stats[k]["saved_for_backward_bytes"] = saved_bytes(fn, inputs)
                    results.append(
                        {
                            "B": B,
                            "T": T,
                            "dtype": dtype_name,
                            "mask": mask_kind,
                            "mode": mode,
                            "reps": reps,
                            "methods": stats,
                        }
                    )
                    print(
                        f"({B:4d},{T:5d}) {dtype_name:8s} {mask_kind:5s} {mode:8s} "
                        + "  ".join(f"{k} {v['full']['median_ms']:.3f}" for k, v in stats.items())
                        + f"   [{time.perf_counter() - t0:.0f}s]",
                        flush=True,
                    )
    report = {"reps": args.reps, "results": results}
    if "eager" in modes:
        report["fixed"] = fixed_cost(args)
    if args.profile:
        prof = {}
        for mask_kind in args.masks:
            inputs = make_inputs(64, 4096, torch.float32, args.device, mask_kind)
            names = ["ess", "ess-reference", "clipped", "reinforce", "step-stats"]
            prof[mask_kind] = profile(inputs, names, reps=10)
            print(f"profiled (64, 4096) float32 {mask_kind} mask", flush=True)
        report["profile"] = {"B": 64, "T": 4096, "dtype": "float32", "by_mask": prof}
        if "compiled" in modes:
            kernels = {}
            for mask_kind in [m for m in args.masks if m in args.compiled_masks]:
                inputs = make_inputs(64, 4096, torch.float32, args.device, mask_kind)
                names = ["ess", "step-stats-fused", "reinforce"]
                kernels[mask_kind] = profile_compiled(inputs, names, reps=10)
                print(f"profiled compiled (64, 4096) float32 {mask_kind} mask", flush=True)
            report["profile_compiled"] = {
                "B": 64,
                "T": 4096,
                "dtype": "float32",
                "by_mask": kernels,
            }
    env = environment(args.device)
    env["load_average_before"] = load_before
    env["load_average_after"] = _load()
    report["environment"] = env
    return report


_busy_note = (
    ": other processes were running, so absolute times are inflated and noisy; the interleaved "
    "repetitions spread that over all methods alike."
)


def _busy(env: dict) -> bool:
    """More runnable processes than CPUs (1-minute load average) at the start or the end."""
    loads = [(env.get(k) or [0.0])[0] for k in ("load_average_before", "load_average_after")]
    return max(loads) > (env.get("cpu_count") or 1)


def _ms(row: dict, phase: str = "full") -> float:
    return row[phase]["median_ms"]


def _pairs(report: dict) -> list[tuple[dict, dict | None]]:
    """(eager result, compiled result or None) per size, dtype and mask."""
    key = lambda r: (r["B"], r["T"], r["dtype"], r["mask"])  # noqa: E731
    compiled = {key(r): r for r in report["results"] if r["mode"] == "compiled"}
    return [(r, compiled.get(key(r))) for r in report["results"] if r["mode"] == "eager"]


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# Cost of the loss: forward + backward",
        "",
        f"{env['date']}, torch {env['torch']}, Python {env['python']}, device {env['device']}"
        f" ({env.get('gpu', env['processor'])}, {env['threads']} threads), "
        f"up to {report['reps']} interleaved repetitions (fewer on the large sizes); "
        "median (IQR) in ms.",
        "",
        f"Command: `{env.get('command', '?')}`. Load average (1, 5, 15 min) before "
        f"{env.get('load_average_before')}, after {env.get('load_average_after')} on "
        f"{env.get('cpu_count')} CPUs" + (_busy_note if _busy(env) else "."),
        "",
        "## Issue 24's targets",
        "",
        "Forward + backward medians of one run. Eager: `ess` (the shipped, fused path) against "
        "the bare clipped surrogate, target <= 1.0; compiled: against compiled REINFORCE, "
        "target <= 1.5. `reference` is the plain-autograd path of the same call; `speed-up` "
        "= reference / fused, same mode. `stats` is `step_stats` (no gradient, eager) as "
        "shipped (plain torch) and, in parentheses, the same statistics from the fused passes "
        "(`step-stats-fused`, not shipped). `floor` (in the full table) is REINFORCE plus "
        "the two transcendental functions per token every ESS implementation needs.",
        "",
        "| B x T | dtype | mask | eager ess | eager clipped | **ess / clipped** | "
        "reference / clipped | speed-up | compiled ess | compiled reinforce | "
        "**ess / reinforce** | floor / reinforce | reference / reinforce | speed-up | "
        "stats ms (fused) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e, c in _pairs(report):
        m = e["methods"]
        ess_e, clip_e, ref_e = _ms(m["ess"]), _ms(m["clipped"]), _ms(m["ess-reference"])
        cells = [
            f"{e['B']}x{e['T']}",
            e["dtype"],
            e["mask"],
            f"{ess_e:.3f}",
            f"{clip_e:.3f}",
            f"**{ess_e / clip_e:.2f}**",
            f"{ref_e / clip_e:.2f}",
            f"{ref_e / ess_e:.2f}x",
        ]
        if c is not None:
            mc = c["methods"]
            ess_c, rf_c, ref_c = _ms(mc["ess"]), _ms(mc["reinforce"]), _ms(mc["ess-reference"])
            floor_c = f"{_ms(mc['floor']) / rf_c:.2f}" if "floor" in mc else "-"
            cells += [
                f"{ess_c:.3f}",
                f"{rf_c:.3f}",
                f"**{ess_c / rf_c:.2f}**",
                floor_c,
                f"{ref_c / rf_c:.2f}",
                f"{ref_c / ess_c:.2f}x",
            ]
        else:
            cells += ["-"] * 6
        st, st_f = m.get("step-stats"), m.get("step-stats-fused")
        cells.append(f"{_ms(st):.3f} ({_ms(st_f):.3f})" if st and st_f else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if report.get("fixed"):
        lines += _fixed_markdown(report)
    if "profile" in report:
        lines += _profile_markdown(report["profile"])
    if "profile_compiled" in report:
        lines += _compiled_profile_markdown(report["profile_compiled"])
    lines += [
        "",
        "## All measurements",
        "",
        "| B x T | dtype | mask | mode | method | forward | backward | fwd+bwd | / clipped "
        "| / reinforce | saved for bwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        m = r["methods"]
        base_c = _ms(m["clipped"])
        base_r = _ms(m["reinforce"])
        for name, row in m.items():
            f, b, full = row["forward"], row["backward"], row["full"]
            lines.append(
                f"| {r['B']}x{r['T']} | {r['dtype']} | {r['mask']} | {r['mode']} | {name} "
                f"| {f['median_ms']:.3f} ({f['iqr_ms']:.3f}) "
                f"| {b['median_ms']:.3f} ({b['iqr_ms']:.3f}) "
                f"| {full['median_ms']:.3f} ({full['iqr_ms']:.3f}) "
                f"| {full['median_ms'] / base_c:.2f} | {full['median_ms'] / base_r:.2f} "
                f"| {row['saved_for_backward_bytes'] / 2**20:.1f} MiB |"
            )
    return "\n".join(lines) + "\n"


def _fixed_markdown(report: dict) -> list[str]:
    """The smallest size's eager time split into the fixed cost of a call, measured at (1, 8)
    tokens, and the rest, which grows with the tokens."""
    eager = [r for r in report["results"] if r["mode"] == "eager"]
    if not eager:
        return []
    B, T = min(((r["B"], r["T"]) for r in eager), key=lambda bt: bt[0] * bt[1])
    at = {(r["dtype"], r["mask"]): r["methods"] for r in eager if (r["B"], r["T"]) == (B, T)}
    lines = [
        "",
        f"## Fixed cost of a call (eager), and the {B}x{T} time split by it",
        "",
        "Forward + backward at (1, 8) tokens: the part of a call's time that does not grow "
        "with its tokens (operator dispatch, Python, autograd bookkeeping and the 0-dim "
        f"arithmetic of the statistics and diagnostics). At {B}x{T}, `per-token` = the "
        f"{B}x{T} median minus the (1, 8) one; `fixed share` = (1, 8) / {B}x{T} for `ess`.",
        "",
        "| dtype | mask | ess (1x8) | clipped (1x8) | reinforce (1x8) | "
        f"ess per-token ({B}x{T}) | clipped per-token | **per-token ess / clipped** | "
        "ess fixed share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["fixed"]:
        m, big = row["methods"], at.get((row["dtype"], row["mask"]))
        fe, fc, fr = _ms(m["ess"]), _ms(m["clipped"]), _ms(m["reinforce"])
        cells = [row["dtype"], row["mask"], f"{fe:.3f}", f"{fc:.3f}", f"{fr:.3f}"]
        if big is not None:
            pe, pc = _ms(big["ess"]) - fe, _ms(big["clipped"]) - fc
            ratio = f"**{pe / pc:.2f}**" if pc > 0 else "-"
            cells += [f"{pe:.3f}", f"{pc:.3f}", ratio, f"{fe / _ms(big['ess']):.0%}"]
        else:
            cells += ["-"] * 4
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _mask_heading(mask_kind: str, by_method: dict) -> list[str]:
    """The heading of one mask's profile table: each method's total self time."""
    totals = ", ".join(f"{n} {p['total_us']:.0f} us" for n, p in by_method.items())
    return ["", f"**{mask_kind} mask.** Total self time: {totals}.", ""]


def _compiled_profile_markdown(prof: dict, top: int = 8) -> list[str]:
    lines = [
        "",
        "## Where the time goes (compiled)",
        "",
        f"`torch.profiler` with Inductor's kernel profiling, ({prof['B']}, {prof['T']}) "
        f"{prof['dtype']}, one forward + backward (us of self CPU time per call, the largest "
        "entries). Each `cpp_fused_*` kernel is one fused loop nest over the tokens (a kernel "
        "can hold several passes, one after the other); the rest is the compiled region's "
        "overhead and any operator Inductor does not generate code for. `step-stats-fused` is "
        "the forward's first passes alone (the maximum and count, then the two sums of "
        "`exp(d - max)`, no gradient): `ess`'s forward kernel minus it is the pass that forms "
        "the loss and the gradient's direction.",
    ]
    for mask_kind, by_method in prof["by_mask"].items():
        names = list(by_method)
        lines += _mask_heading(mask_kind, by_method)
        lines += [
            "| method | entry | n | us |",
            "|---|---|---|---|",
        ]
        for n in names:
            for o in by_method[n]["ops"][:top]:
                op = o["op"] if len(o["op"]) <= 90 else o["op"][:87] + "..."
                lines.append(f"| {n} | `{op}` | {o['calls']:.0f} | {o['self_us']:.0f} |")
    return lines


def _profile_markdown(prof: dict, top: int = 14) -> list[str]:
    lines = [
        "",
        "## Where the time goes (eager)",
        "",
        f"`torch.profiler`, ({prof['B']}, {prof['T']}) {prof['dtype']}, one forward + backward "
        "(us of self CPU time per call, the largest operators; `n` = calls per loss call). "
        "Every operator is one pass over the tokens (or a handful of scalar operations).",
    ]
    for mask_kind, by_method in prof["by_mask"].items():
        names = list(by_method)
        lines += _mask_heading(mask_kind, by_method)
        lines += [
            "| " + " | ".join(f"{n}: op | n | us" for n in names[:3]) + " |",
            "|" + "---|---|---|" * len(names[:3]),
        ]
        for i in range(top):
            cells = []
            for n in names[:3]:
                ops = by_method[n]["ops"]
                if i < len(ops):
                    o = ops[i]
                    cells.append(f"{o['op']} | {o['calls']:.0f} | {o['self_us']:.0f}")
                else:
                    cells.append(" | | ")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(report: dict, path: Path) -> None:
    """Issue 24's ratios per size: eager ess / clipped and compiled ess / reinforce, fused and
    reference, one panel per dtype and mask."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = _pairs(report)
    panels = sorted({(e["dtype"], e["mask"]) for e, _ in pairs})
    fig, axes = plt.subplots(
        len(panels), 2, figsize=(11, 3.0 * len(panels)), squeeze=False, sharey="col"
    )
    for i, (dtype, mask_kind) in enumerate(panels):
        rows = [(e, c) for e, c in pairs if (e["dtype"], e["mask"]) == (dtype, mask_kind)]
        labels = [f"{e['B']}x{e['T']}" for e, _ in rows]
        xs = range(len(rows))
        for j, (mode, base, target) in enumerate(
            (("eager", "clipped", 1.0), ("compiled", "reinforce", 1.5))
        ):
            ax = axes[i][j]
            if all((e if mode == "eager" else c) is None for e, c in rows):
                ax.set_axis_off()
                ax.set_title(f"{mode}, {dtype}, {mask_kind} mask: not measured", fontsize=9)
                continue
            # compiled: also the floor (REINFORCE plus two transcendental functions per token)
            names = ("ess", "ess-reference") + (("floor",) if mode == "compiled" else ())
            width = 0.8 / len(names)
            for k, name in enumerate(names):
                vals = []
                for e, c in rows:
                    r = e if mode == "eager" else c
                    ok = r is not None and name in r["methods"]
                    vals.append(
                        _ms(r["methods"][name]) / _ms(r["methods"][base]) if ok else float("nan")
                    )
                offsets = [x + (k - (len(names) - 1) / 2) * width for x in xs]
                ax.bar(offsets, vals, width, label=name, color=f"C{k}")
            if mode == "compiled" and i == 0:
                ax.legend(fontsize=8)
            ax.axhline(target, color="black", lw=0.8, ls="--")
            ax.set_xticks(list(xs), labels, fontsize=8)
            ax.set_title(f"{mode}, {dtype}, {mask_kind} mask: / {base}", fontsize=9)
    axes[0][0].legend(fontsize=8)
    env = report["environment"]
    fig.suptitle(
        f"Cost of the loss (torch {env['torch']}, {env['device']}, {env['threads']} threads); "
        "dashed: issue 24's target"
    )
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="(64, 4096) float32, bool/float masks")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per method")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument(
        "--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"]
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--sizes", nargs="+", default=None, help="e.g. 8x1024 64x4096")
    p.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--masks", nargs="+", default=None, choices=MASKS)
    p.add_argument(
        "--compiled-masks",
        nargs="+",
        default=MASKS,
        choices=MASKS,
        help="masks also measured compiled (default: %(default)s)",
    )
    p.add_argument(
        "--compiled-methods",
        nargs="+",
        default=["reinforce", "clipped", "ess", "ess-reference", "floor"],
        choices=list(METHODS),
        help="methods measured compiled (default: %(default)s)",
    )
    p.add_argument("--profile", action="store_true", help="add the eager operator profile")
    p.add_argument(
        "--out",
        type=Path,
        default=Path(tempfile.gettempdir()) / "ess_po_loss_cost",
        help="output folder (default: %(default)s); the committed results use "
        "docs/results/loss_cost",
    )
    p.add_argument("--stem", default=None, help="file name stem (default: loss_cost[_quick])")
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 30 if args.quick else 50
    args.sizes = args.sizes or (["64x4096"] if args.quick else [f"{b}x{t}" for b, t in FULL_SIZES])
    args.dtypes = args.dtypes or (["float32"] if args.quick else ["float32", "bfloat16"])
    args.masks = args.masks or (["bool", "float"] if args.quick else MASKS)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda requested but torch.cuda.is_available() is False")
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("loss_cost_quick" if args.quick else "loss_cost")
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"{stem}.md").write_text(markdown(report))
    plot(report, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json, .md and .png")


if __name__ == "__main__":
    main()
