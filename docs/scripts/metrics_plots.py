"""Make the figures of the documentation (docs/results/metrics/*.png), reproducibly, on CPU.

    python docs/scripts/metrics_plots.py                       # all figures (~1 min; runs the demo)
    python docs/scripts/metrics_plots.py --demo-metrics outputs/tiny_grpo/metrics.jsonl
    python docs/scripts/metrics_plots.py --skip-demo           # only the synthetic figures

Figures:

* ``weights.png``     the per-token gradient weight of PPO/GRPO clipping, CISPO and the ESS
                      objective as a function of the ratio (no training; closed forms).
* ``staleness.png``   ``ess_policy_loss`` diagnostics on synthetic batches whose current policy
                      drifts further and further from the behaviour policy that sampled them.
* ``reuse.png``       a small tabular policy trained for many epochs on one batch (the regime of
                      ``num_iterations`` / ``ppo_epochs``), at a small and a large learning rate.
* ``outliers.png``    how a few tokens with very large ratios (a sampler mismatch) collapse the
                      batch ESS, and what the per-sequence scope sees instead.
* ``demo.png``        the ``ess/*`` metrics of ``examples/train_tiny_grpo.py`` (TRL, tiny model).

Everything is seeded; the synthetic figures need only torch and matplotlib, the demo figure needs
the ``trl`` extra (or an existing ``metrics.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from ess_po import ess_policy_loss

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "results" / "metrics"
COLORS = {"ess": "C0", "capped": "C1", "kl": "C2", "ratio": "C3", "reward": "C4"}


def _diagnostics(logp_new, logp_old, adv, mask, **kw) -> dict[str, float]:
    out = ess_policy_loss(logp_new, logp_old, adv, mask, **kw)
    return {k: float(v) for k, v in out.metrics().items()}


def fig_weights(path: Path) -> None:
    """Gradient weight on A * grad log pi per token, as a function of the ratio w."""
    w = torch.linspace(0.01, 3.0, 600)
    eps, eps_high = 0.2, 0.28
    ppo_pos = torch.where(w <= 1 + eps, w, 0.0)  # A > 0: gradient vanishes above 1 + eps
    ppo_neg = torch.where(w >= 1 - eps, w, 0.0)  # A < 0: gradient vanishes below 1 - eps
    cispo = torch.clamp(w, max=1 + eps_high)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    ax.plot(w, ppo_pos, color="0.5", ls="--", label="PPO/GRPO clip, A > 0 (ε = 0.2)")
    ax.plot(w, ppo_neg, color="0.5", ls=":", label="PPO/GRPO clip, A < 0")
    ax.plot(w, cispo, color="C5", label="CISPO (ε_high = 0.28)")
    for ess, c in ((0.9, "C0"), (0.5, "C9")):
        ax.plot(w, torch.clamp(w, max=ess), color=c, lw=2, label=f"ESS objective, ESS = {ess}")
    ax.plot(w, w, color="k", lw=0.6, alpha=0.5, label="plain importance weight w")
    ax.set(xlabel="ratio w = π_θ / π_old", ylabel="weight on A·∇log π_θ", ylim=(0, 2.0))
    ax.set_title("policy term: how much of A·∇log π a token contributes")
    ax.legend(fontsize=8, loc="upper left")
    ax = axes[1]
    for ess, c in ((0.9, "C0"), (0.5, "C9"), (0.1, "C3")):
        ax.plot(w, (1 - ess) * (1 - 1 / w), color=c, lw=2, label=f"ESS = {ess}")
    ax.axhline(0, color="k", lw=0.6)
    ax.set(xlabel="ratio w", ylabel="coefficient on ∇log π_θ", ylim=(-2.0, 1.0))
    ax.set_title("regulariser: (1 − ESS)(1 − 1/w), pulls w back to 1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sample(logits: torch.Tensor, B: int, g: torch.Generator) -> torch.Tensor:
    """Sample B sequences of tokens from per-position categorical logits (T, V)."""
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs, B, replacement=True, generator=g).T  # (B, T)


def fig_staleness(path: Path) -> None:
    """Diagnostics on batches sampled from pi_old, scored under pi_new = pi_old + sigma * noise."""
    g = torch.Generator().manual_seed(0)
    T, V, B = 64, 32, 64
    old_logits = 2.0 * torch.randn(T, V, generator=g)
    noise = torch.randn(T, V, generator=g)
    tokens = _sample(old_logits, B, g)
    mask = torch.ones(B, T, dtype=torch.bool)
    adv = torch.randn(B, generator=g)
    sigmas = torch.linspace(0, 2.0, 41)
    rows = []
    for s in sigmas:
        new_logits = old_logits + s * noise
        lo, ln = old_logits.log_softmax(-1), new_logits.log_softmax(-1)
        logp_old = lo.gather(1, tokens.T).T.contiguous()
        logp_new = ln.gather(1, tokens.T).T.contiguous()
        d = _diagnostics(logp_new, logp_old, adv, mask)
        d["true_kl"] = float((lo.exp() * (lo - ln)).sum(-1).mean())  # KL(pi_old || pi_new)
        d["true_rkl"] = float((ln.exp() * (ln - lo)).sum(-1).mean())  # KL(pi_new || pi_old)
        rows.append(d)
    x = sigmas.numpy()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    axes = axes.ravel()
    axes[0].plot(x, [r["ess"] for r in rows], color=COLORS["ess"], lw=2)
    axes[0].set(title="ESS", ylim=(0, 1.05))
    axes[1].plot(x, [r["capped_frac"] for r in rows], color=COLORS["capped"], lw=2)
    axes[1].set(title="capped fraction", ylim=(0, 1.05))
    axes[2].plot(x, [r["kl_behavior"] for r in rows], color=COLORS["kl"], lw=2, label="kl_behavior")
    axes[2].plot(x, [r["true_kl"] for r in rows], color="k", ls="--", label="exact KL(π_old‖π_θ)")
    axes[2].plot(x, [r["true_rkl"] for r in rows], color="k", ls=":", label="exact KL(π_θ‖π_old)")
    axes[2].set(title="behaviour KL (k3 estimate)", yscale="symlog", ylim=(0, None))
    axes[2].legend(fontsize=8)
    axes[3].semilogy(x, [r["ratio_max"] for r in rows], color=COLORS["ratio"], lw=2)
    axes[3].semilogy(x, [r["ratio_mean"] for r in rows], color=COLORS["ratio"], ls=":", lw=1.5)
    axes[3].set(title="ratio max (solid), mean (dotted)")
    for ax in axes:
        ax.set_xlabel("drift σ of the current policy's logits")
        ax.grid(alpha=0.3)
    fig.suptitle(f"one batch of {B}×{T} tokens, scored by policies drifting from the sampler")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _train_on_one_batch(lr: float, epochs: int, seed: int = 0) -> list[dict[str, float]]:
    """A tabular policy (T positions x V tokens), one sampled batch reused for `epochs` steps."""
    g = torch.Generator().manual_seed(seed)
    T, V, B = 16, 8, 64
    reward_table = torch.randn(T, V, generator=g)
    logits = (0.5 * torch.randn(T, V, generator=g)).requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)
    with torch.no_grad():
        tokens = _sample(logits, B, g)
        reward = reward_table.gather(1, tokens.T).T.mean(-1)  # (B,)
        adv = (reward - reward.mean()) / (reward.std() + 1e-6)
        logp_old = logits.log_softmax(-1).gather(1, tokens.T).T.contiguous()
    mask = torch.ones(B, T, dtype=torch.bool)
    rows = []
    for _ in range(epochs):
        logp_new = logits.log_softmax(-1).gather(1, tokens.T).T.contiguous()
        out = ess_policy_loss(logp_new, logp_old, adv, mask)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        rows.append({k: float(v) for k, v in out.metrics().items()})
    return rows


def fig_reuse(path: Path) -> None:
    epochs = 30
    runs = {lr: _train_on_one_batch(lr, epochs) for lr in (0.03, 0.3)}
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    axes = axes.ravel()
    keys = [("ess", "ESS"), ("capped_frac", "capped fraction"), ("kl_behavior", "behaviour KL")]
    for (lr, rows), ls in zip(runs.items(), ("-", "--"), strict=True):
        x = range(1, epochs + 1)
        for ax, (k, title) in zip(axes, keys, strict=False):
            ax.plot(x, [r[k] for r in rows], ls=ls, lw=2, label=f"lr {lr}")
            ax.set_title(title)
        axes[3].semilogy(x, [r["ratio_max"] for r in rows], ls=ls, lw=2, label=f"lr {lr}")
        axes[3].set_title("ratio max")
    axes[0].set_ylim(0, 1.05)
    axes[1].set_ylim(0, 1.05)
    for ax in axes:
        ax.set_xlabel("optimizer step on the same batch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("one batch reused for 30 Adam steps (tabular policy, 64 sequences × 16 tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_outliers(path: Path) -> None:
    """A healthy slightly-stale batch plus k tokens whose log ratio is +8 (sampler mismatch)."""
    g = torch.Generator().manual_seed(1)
    B, T = 32, 128
    n = B * T
    base = 0.1 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    ks = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256]
    batch, seq_mean, seq_min = [], [], []
    for k in ks:
        lr = base.clone()
        idx = torch.randperm(n, generator=g)[:k]
        lr.view(-1)[idx] = 8.0  # sampler gave the token ~e^-8 of the trainer's probability
        logp_old = torch.full((B, T), -2.0)
        logp_new = logp_old + lr
        batch.append(_diagnostics(logp_new, logp_old, adv, mask)["ess"])
        seq = _diagnostics(logp_new, logp_old, adv, mask, ess_scope="sequence")
        seq_mean.append(seq["ess"])
        seq_min.append(seq["ess_min"])
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    x = [max(k, 0.5) for k in ks]
    ax.semilogx(x, batch, "o-", lw=2, label="batch ESS (ess_scope='batch')")
    ax.semilogx(x, seq_mean, "s--", lw=1.5, label="mean per-sequence ESS ('sequence')")
    ax.semilogx(x, seq_min, "^:", lw=1.5, label="min per-sequence ESS")
    ax.set(
        xlabel=f"tokens with log ratio +8, out of {n} (0 plotted at 0.5)",
        ylabel="ESS",
        ylim=(0, 1.05),
        title="a handful of extreme ratios collapses the batch ESS",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run_demo(workdir: Path) -> Path:
    cmd = [sys.executable, str(ROOT / "examples" / "train_tiny_grpo.py"), "--output-dir"]
    subprocess.run([*cmd, str(workdir)], check=True, cwd=ROOT)
    return workdir / "metrics.jsonl"


def fig_demo(metrics: Path, path: Path) -> None:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "ess/mean" in r]
    step = [r["step"] for r in rows]
    on = [r["ess/mean"] >= 1.0 - 1e-6 for r in rows]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    axes = axes.ravel()
    axes[5].axis("off")
    reward = [(r["step"], r["reward"]) for r in rows if "reward" in r]
    axes[0].plot([s for s, _ in reward], [v for _, v in reward], color=COLORS["reward"])
    axes[0].set_title("reward (generation steps)")
    series = [
        ("ess/mean", "ESS", COLORS["ess"], False),
        ("ess/capped_frac", "capped fraction", COLORS["capped"], False),
        ("ess/kl_behavior", "behaviour KL", COLORS["kl"], False),
        ("ess/ratio_max", "ratio max", COLORS["ratio"], True),
    ]
    for ax, (key, title, color, log) in zip(axes[1:5], series, strict=True):
        off_x = [s for s, o in zip(step, on, strict=True) if not o]
        off_y = [r[key] for r, o in zip(rows, on, strict=True) if not o]
        on_x = [s for s, o in zip(step, on, strict=True) if o]
        on_y = [r[key] for r, o in zip(rows, on, strict=True) if o]
        ax.plot(off_x, off_y, ".", color=color, ms=4, label="off-policy steps")
        ax.plot(on_x, on_y, "x", color="0.6", ms=3, label="on-policy steps")
        if log:
            ax.set_yscale("log")
        ax.set_title(title)
    axes[1].set_ylim(0, 1.05)
    axes[2].set_ylim(0, 1.05)
    axes[1].legend(fontsize=8, loc="lower left")
    for ax in axes[:5]:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.suptitle(
        "examples/train_tiny_grpo.py: ESSGRPOTrainer, num_iterations=2, steps_per_generation=2"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT, help="folder for the PNGs")
    p.add_argument("--demo-metrics", type=Path, default=None, help="existing demo metrics.jsonl")
    p.add_argument("--skip-demo", action="store_true", help="synthetic figures only")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    fig_weights(args.out / "weights.png")
    fig_staleness(args.out / "staleness.png")
    fig_reuse(args.out / "reuse.png")
    fig_outliers(args.out / "outliers.png")
    if not args.skip_demo:
        metrics = args.demo_metrics
        if metrics is None:
            metrics = _run_demo(Path(tempfile.mkdtemp(prefix="ess_demo_")))
        fig_demo(metrics, args.out / "demo.png")
    print(f"wrote figures to {args.out}")


if __name__ == "__main__":
    main()
