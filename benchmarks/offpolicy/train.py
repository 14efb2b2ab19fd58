r"""The study's GRPO loop: task, rollout engines (fp32 / bf16 / FP8 / tempered), one training run.

A minimal GRPO loop in plain PyTorch trains a tiny Qwen2 (``ess_po.testing.tiny``,
warm-started by a short supervised phase) on a synthetic task with a verifiable reward. Each
step samples :math:`G` completions for each of :math:`P` prompts with the rollout engine,
scores them, normalises the rewards within each group,
:math:`A_i = (r_i - \bar r_g) / (s_g + 10^{-4})`, and takes Adam steps on the method's
token-mean policy loss of the trainer's float32 log-probabilities (temperature 1).
"""

from __future__ import annotations

import copy
import math
import random
import statistics
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from offpolicy.conditions import Condition
from offpolicy.methods import Method, policy_loss, ratio_diagnostics

TASKS = ("reverse", "copy", "sort")


@dataclass(frozen=True)
class StudyConfig:
    """Everything shared by all runs of a study (model, task, loop sizes)."""

    task: str = "reverse"
    alphabet: str = "abcdef"
    prompt_len: int = 8
    hidden_size: int = 64
    num_layers: int = 2
    prompts_per_step: int = 8
    group_size: int = 8
    steps: int = 300
    lr: float = 5e-4
    max_grad_norm: float = 1.0
    eval_every: int = 25
    eval_prompts: int = 128
    warm_steps: int = 100
    warm_lr: float = 3e-3
    warm_batch: int = 32

    @property
    def max_new_tokens(self) -> int:
        return self.prompt_len + 2


@dataclass
class Task:
    """Tokenizer, prompt stream and reward of the synthetic task."""

    tokenizer: Any
    prompts: list[str]
    answers: list[str]
    id_to_text: list[str] = field(default_factory=list)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return torch.tensor(ids, dtype=torch.long)

    def rewards(self, completions: torch.Tensor, mask: torch.Tensor, answers: Sequence[str]):
        """``tiny.copy_reward`` (fraction of target positions hit) of the decoded completions."""
        from ess_po.testing import tiny

        texts = [
            "".join(
                self.id_to_text[t] for t, m in zip(row.tolist(), mrow.tolist(), strict=True) if m
            )
            for row, mrow in zip(completions, mask, strict=True)
        ]
        return torch.tensor(tiny.copy_reward(texts, list(answers)), dtype=torch.float32)


def task_rows(cfg: StudyConfig, n: int, seed: int) -> list[dict[str, str]]:
    """``n`` prompts ``"<s>="`` (``s``: ``cfg.prompt_len`` random characters) and their targets.

    ``reverse``: the target is ``s`` reversed (harder than ``copy``, so reward keeps rising over
    the run instead of plateauing early); ``copy``: ``s`` itself; ``sort``: the characters of
    ``s`` in sorted order.
    """
    if cfg.task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {cfg.task!r}")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        s = "".join(rng.choice(cfg.alphabet) for _ in range(cfg.prompt_len))
        target = {"reverse": s[::-1], "copy": s, "sort": "".join(sorted(s))}[cfg.task]
        rows.append({"prompt": s + "=", "answer": target})
    return rows


def build_task(cfg: StudyConfig, n: int, seed: int) -> Task:
    from ess_po.testing import tiny

    tok = tiny.build_tiny_tokenizer(cfg.alphabet)
    rows = task_rows(cfg, n, seed)
    id_to_text = tok.convert_ids_to_tokens(list(range(len(tok))))
    id_to_text = ["" if t == tok.eos_token else t for t in id_to_text]
    return Task(tok, [r["prompt"] for r in rows], [r["answer"] for r in rows], id_to_text)


def build_model(cfg: StudyConfig, task: Task, seed: int) -> torch.nn.Module:
    from ess_po.testing import tiny

    return tiny.build_tiny_model(
        task.tokenizer,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        max_positions=cfg.prompt_len + 1 + cfg.max_new_tokens + 4,
        seed=seed,
    )


# --------------------------------------------------------------------------------------------
# Rollout engines
# --------------------------------------------------------------------------------------------


def fake_quant_fp8(w: torch.Tensor, *, per_channel: bool) -> torch.Tensor:
    r"""Round ``w`` through ``float8_e4m3fn`` with absmax scales: :math:`s = \max|w| / 448`
    (per tensor, or per output channel = row), :math:`\hat w = s\,\mathrm{fp8}(w / s)`;
    returned in ``w``'s dtype."""
    w32 = w.float()
    amax = w32.abs().amax(dim=1, keepdim=True) if per_channel else w32.abs().amax()
    scale = amax.clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
    return ((w32 / scale).to(torch.float8_e4m3fn).float() * scale).to(w.dtype)


class RolloutEngine:
    """The sampler's copy of the policy, refreshed from the trainer before each rollout."""

    def __init__(self, model: torch.nn.Module, condition: Condition) -> None:
        self.condition = condition
        self.trainer = model
        self.model = model
        if condition.sampler != "fp32":
            self.model = copy.deepcopy(model).to(torch.bfloat16).eval()

    @torch.no_grad()
    def refresh(self) -> None:
        if self.model is self.trainer:
            return
        self.model.load_state_dict(self.trainer.state_dict())  # cast to bfloat16
        if self.condition.sampler.startswith("fp8"):
            per_channel = self.condition.sampler == "fp8-channel"
            for name, mod in self.model.named_modules():
                # Linear layers only; the tied embedding / LM head stays bf16, as engines keep it.
                if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
                    mod.weight.copy_(fake_quant_fp8(mod.weight, per_channel=per_channel))


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    report_untempered: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Sample with a KV cache; return ``(tokens, mask, logp)``, each ``(N, T)``.

    ``logp``: :math:`\log\operatorname{softmax}(z/\tau)` of each sampled token (the distribution
    it was drawn from), or :math:`\log\operatorname{softmax}(z)` if ``report_untempered``;
    float32 from the model's logits whatever its dtype. ``mask`` is 1 up to and including EOS.
    """
    n = prompt_ids.shape[0]
    out = model(input_ids=prompt_ids, use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1]
    tokens, logps, masks = [], [], []
    alive = torch.ones(n, dtype=torch.bool)
    for t in range(max_new_tokens):
        z = logits.float()
        logp_all = torch.log_softmax(z / temperature, dim=-1)
        tok = torch.multinomial(logp_all.exp(), 1, generator=generator).squeeze(-1)
        reported = torch.log_softmax(z, dim=-1) if report_untempered else logp_all
        lp = reported.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
        tokens.append(torch.where(alive, tok, pad_id))
        logps.append(torch.where(alive, lp, 0.0))
        masks.append(alive.clone())
        alive = alive & (tok != eos_id)
        if not alive.any() or t == max_new_tokens - 1:
            break
        out = model(input_ids=tok.unsqueeze(-1), past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    return torch.stack(tokens, 1), torch.stack(masks, 1), torch.stack(logps, 1)


def token_logps(
    model: torch.nn.Module, prompt_ids: torch.Tensor, completions: torch.Tensor
) -> torch.Tensor:
    r"""Trainer log-probabilities :math:`\log\pi_\theta(y_t \mid x, y_{<t})` at temperature 1."""
    ids = torch.cat([prompt_ids, completions], dim=1)
    logits = model(input_ids=ids, use_cache=False).logits[:, prompt_ids.shape[1] - 1 : -1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, completions.unsqueeze(-1)).squeeze(-1)


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    r"""GRPO advantages :math:`(r - \bar r_g) / (s_g + 10^{-4})` within groups of ``group_size``."""
    r = rewards.view(-1, group_size)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)
    return adv.reshape(-1)


@dataclass
class Rollout:
    prompt_ids: torch.Tensor
    completions: torch.Tensor
    mask: torch.Tensor
    behaviour_logp: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor


# --------------------------------------------------------------------------------------------
# Warm start, evaluation, one run
# --------------------------------------------------------------------------------------------


def warm_start_state(cfg: StudyConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random init + a short supervised phase (``tiny.warm_start``); returns the state dict."""
    from ess_po.testing import tiny

    torch.set_num_threads(1)
    task = build_task(cfg, 8, seed=10_000 + seed)
    model = build_model(cfg, task, seed)
    rows = task_rows(cfg, 2048, seed=20_000 + seed)
    tiny.warm_start(
        model,
        task.tokenizer,
        rows,
        steps=cfg.warm_steps,
        batch_size=cfg.warm_batch,
        lr=cfg.warm_lr,
        seed=seed,
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def evaluate(model: torch.nn.Module, task: Task, cfg: StudyConfig) -> float:
    """Mean reward of one temperature-1 float32 sample on each fixed eval prompt (fixed seed)."""
    prompt_ids = task.encode(task.prompts[: cfg.eval_prompts])
    g = torch.Generator().manual_seed(12345)
    comp, mask, _ = sample(
        model,
        prompt_ids,
        max_new_tokens=cfg.max_new_tokens,
        eos_id=task.tokenizer.eos_token_id,
        pad_id=task.tokenizer.pad_token_id,
        generator=g,
    )
    return float(task.rewards(comp, mask, task.answers[: cfg.eval_prompts]).mean())


def _update_loss(
    method: Method,
    logp: torch.Tensor,
    batch: Rollout,
    trainer_old: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one optimizer update: one call, or a sum over micro-batch calls."""
    if not method.micro_batch:
        return policy_loss(
            method, logp, batch.behaviour_logp, batch.advantages, batch.mask, trainer_old
        )
    n_total = batch.mask.sum().clamp(min=1).float()  # global token count: token-mean overall
    slices = [
        slice(lo, lo + method.micro_batch) for lo in range(0, logp.shape[0], method.micro_batch)
    ]
    step_ess, stats = None, None
    if method.scope == "step":
        # One ESS over the whole update, from the same no-grad log-ratios every call sees.
        log_ratio = (logp - batch.behaviour_logp).detach()
        if method.kind == "ess":
            from ess_po import step_stats

            stats = step_stats([(log_ratio[sl], batch.mask[sl]) for sl in slices])
        else:
            from ess_po import effective_sample_size

            step_ess = effective_sample_size(log_ratio, batch.mask)
    total, call_ess = torch.zeros(()), []
    for sl in slices:
        loss, extra = policy_loss(
            method,
            logp[sl],
            batch.behaviour_logp[sl],
            batch.advantages[sl],
            batch.mask[sl],
            ess=step_ess,
            stats=stats,
            normalizer=n_total,
        )
        total = total + loss
        call_ess.append(extra["call_ess"])
    return total, {"call_ess_min": min(call_ess), "call_ess_median": statistics.median(call_ess)}


def run_cell(
    cfg: StudyConfig,
    condition: Condition,
    method: Method,
    seed: int,
    init_state: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """Train one (condition, method, seed) cell from ``init_state``; return its curves.

    Per step (measured on the ratios :math:`\\pi_\\theta/\\mu` before each update, then
    averaged or minimised over the batch's updates): ``batch_reward``, ``ess`` (mean),
    ``ess_min`` (smallest), ``kl`` (mean k3), ``log_ratio_min`` (smallest log-ratio of any
    token), ``frac_below_10`` (share of tokens with log-ratio < -10); ``capped_frac`` for the
    library's ESS; ``call_ess_min`` for micro-batched ESS. Also ``eval_steps``/``eval_reward``,
    ``skipped_updates`` (non-finite loss or gradient), ``seconds``.
    """
    torch.set_num_threads(1)
    start = time.perf_counter()
    train_task = build_task(cfg, cfg.steps * cfg.prompts_per_step + 64, seed=seed)
    eval_task = build_task(cfg, cfg.eval_prompts, seed=99_999)
    tok = train_task.tokenizer
    model = build_model(cfg, train_task, seed)
    model.load_state_dict(init_state)
    model.eval()  # no dropout anywhere; the same graph samples and trains
    engine = RolloutEngine(model, condition)
    lr = cfg.lr if condition.lr is None else condition.lr
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1_000 + seed)
    cursor = 0

    def new_rollout() -> Rollout:
        nonlocal cursor
        lo, hi = cursor, cursor + cfg.prompts_per_step
        cursor = hi % (len(train_task.prompts) - cfg.prompts_per_step)
        prompts = [p for p in train_task.prompts[lo:hi] for _ in range(cfg.group_size)]
        answers = [a for a in train_task.answers[lo:hi] for _ in range(cfg.group_size)]
        engine.refresh()
        prompt_ids = train_task.encode(prompts)
        comp, mask, blogp = sample(
            engine.model,
            prompt_ids,
            max_new_tokens=cfg.max_new_tokens,
            eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id,
            generator=gen,
            temperature=condition.temperature,
            report_untempered=condition.report_untempered,
        )
        rewards = train_task.rewards(comp, mask, answers)
        return Rollout(
            prompt_ids, comp, mask, blogp, rewards, group_advantages(rewards, cfg.group_size)
        )

    keys = ("batch_reward", "ess", "ess_min", "kl", "log_ratio_min", "frac_below_10")
    curves: dict[str, list[float]] = {k: [] for k in keys}
    extra_curves: dict[str, list[float]] = {}
    eval_steps, eval_reward = [0], [evaluate(model, eval_task, cfg)]
    queue: deque[Rollout] = deque(new_rollout() for _ in range(condition.staleness))
    skipped = 0
    for step in range(1, cfg.steps + 1):
        queue.append(new_rollout())
        batch = queue.popleft()
        trainer_old = None
        if method.needs_trainer_old:
            with torch.no_grad():
                trainer_old = token_logps(model, batch.prompt_ids, batch.completions)
        diags: list[dict[str, float]] = []
        for _ in range(condition.epochs):
            logp = token_logps(model, batch.prompt_ids, batch.completions)
            diag = ratio_diagnostics(logp, batch.behaviour_logp, batch.mask)
            loss, extra = _update_loss(method, logp, batch, trainer_old)
            diags.append(diag | extra)
            opt.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                skipped += 1
                continue
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            if not torch.isfinite(norm):
                skipped += 1
                continue
            if method.vcpo:  # VCPO: step size times sqrt(ESS of the update's ratios pi/mu)
                for group in opt.param_groups:
                    group["lr"] = lr * math.sqrt(diag["ess"])
            opt.step()
        curves["batch_reward"].append(float(batch.rewards.mean()))
        curves["ess"].append(statistics.fmean(d["ess"] for d in diags))
        curves["ess_min"].append(min(d["ess"] for d in diags))
        curves["kl"].append(statistics.fmean(d["kl"] for d in diags))
        curves["log_ratio_min"].append(min(d["log_ratio_min"] for d in diags))
        curves["frac_below_10"].append(statistics.fmean(d["frac_below_10"] for d in diags))
        for key in ("capped_frac", "call_ess_min", "ess_prox"):
            if key in diags[0]:
                agg = min if key == "call_ess_min" else statistics.fmean
                extra_curves.setdefault(key, []).append(agg(d[key] for d in diags))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            eval_steps.append(step)
            eval_reward.append(evaluate(model, eval_task, cfg))
    curves |= extra_curves
    return {
        "task": cfg.task,
        "condition": condition.name,
        "method": method.name,
        "seed": seed,
        "eval_steps": eval_steps,
        "eval_reward": [round(x, 5) for x in eval_reward],
        **{k: [round(x, 6) for x in v] for k, v in curves.items()},
        "skipped_updates": skipped,
        "final_reward": final_reward(eval_reward),
        "collapsed": collapsed(eval_reward),
        "seconds": time.perf_counter() - start,
    }


def final_reward(eval_reward: Sequence[float], last: int = 3) -> float:
    """Mean of the last ``last`` evaluations."""
    return statistics.fmean(list(eval_reward)[-last:])


def collapsed(eval_reward: Sequence[float], min_tail: int = 2) -> bool:
    """Reward fell below half its peak after the peak and stayed there to the end.

    True iff the last ``min_tail`` (or more) evaluations, all after the peak, are below
    ``0.5 * peak``.
    """
    r = list(eval_reward)
    peak_at = max(range(len(r)), key=r.__getitem__)
    half = 0.5 * r[peak_at]
    tail = 0
    for x in reversed(r[peak_at + 1 :]):
        if x >= half:
            break
        tail += 1
    return tail >= min_tail
