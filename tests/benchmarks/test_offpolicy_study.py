"""Tests of the off-policy study (benchmarks/offpolicy/): the ESS tail variants against the
library, the FP8 / tempered rollout engines, micro-batch scopes, and a few finite RL steps."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from offpolicy import conditions as C
from offpolicy import methods as M
from offpolicy import proximal, report, study, train

from ess_po import ess_policy_loss

CFG = dataclasses.replace(
    train.StudyConfig(),
    steps=2,
    eval_every=1,
    eval_prompts=8,
    warm_steps=2,
    warm_batch=8,
    prompts_per_step=2,
    group_size=4,
)


def _batch(seed: int = 0, b: int = 6, t: int = 5):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    d = torch.randn(b, t, generator=g, dtype=torch.float64) * 0.5
    # Far-off tokens on both sides of each tail threshold (10 and 50).
    d[0, :4] = torch.tensor([-60.0, -49.5, -12.0, -9.0], dtype=torch.float64)
    d[1, 0] = 11.0
    new = (old + d).requires_grad_(True)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[2, 3:] = False
    return new, old, adv, mask


def test_linear_tail_50_matches_the_library():
    """The benchmark's L = 50 variant is the library's objective: same loss, same gradient.

    Mutation check: with threshold 49 in the variant, the token at d = -49.5 makes both the
    loss and the gradient differ and this test fails.
    """
    new, old, adv, mask = _batch()
    loss, _ = M.ess_variant_loss(new, old, adv, mask, tail="linear", threshold=50.0)
    (g_ref,) = torch.autograd.grad(loss, new)
    new2 = new.detach().clone().requires_grad_(True)
    out = ess_policy_loss(new2, old, adv, mask)
    (g_lib,) = torch.autograd.grad(out.loss, new2)
    torch.testing.assert_close(loss.detach(), out.loss.detach().to(loss.dtype), rtol=1e-6, atol=0)
    torch.testing.assert_close(g_ref, g_lib.to(g_ref.dtype), rtol=1e-6, atol=1e-12)


def test_tail_gradients_have_the_documented_sign_and_size():
    """d k3/dd below the threshold: linear tail 1 - e^L (pulls d up), clamp tail +1 (pushes down)."""
    d = torch.tensor([-30.0, -12.0, -5.0, 0.0, 5.0, 12.0], dtype=torch.float64, requires_grad=True)
    exact = 1 - torch.exp(-d.detach())
    (g_lin,) = torch.autograd.grad(M.k3(d, tail="linear", threshold=10.0).sum(), d)
    (g_clamp,) = torch.autograd.grad(M.k3(d, tail="clamp", threshold=10.0).sum(), d)
    inside = d.detach().abs() <= 10
    torch.testing.assert_close(g_lin[inside], exact[inside])
    torch.testing.assert_close(g_clamp[inside], exact[inside])
    torch.testing.assert_close(g_lin[:2], torch.full((2,), 1 - math.exp(10.0), dtype=d.dtype))
    torch.testing.assert_close(g_clamp[:2], torch.ones(2, dtype=d.dtype))
    # Values are continuous at the threshold.
    at = torch.tensor([-10.0 - 1e-9, -10.0 + 1e-9], dtype=torch.float64)
    for tail in ("linear", "clamp"):
        v = M.k3(at, tail=tail, threshold=10.0)
        assert abs(float(v[0] - v[1])) < 1e-4


def test_step_scope_makes_micro_batching_exact():
    """Step-scope ESS: the summed micro-batch gradient equals the whole-batch one; per-call
    scope does not (mutation: using the call's own ESS in the step branch fails the first check)."""
    new, old, adv, mask = _batch(1, b=8)
    whole, ess = M.ess_variant_loss(new, old, adv, mask)
    (g_whole,) = torch.autograd.grad(whole, new)
    n = mask.sum().double()
    for scope in ("step", "call"):
        total = sum(
            M.ess_variant_loss(
                new[i : i + 2],
                old[i : i + 2],
                adv[i : i + 2],
                mask[i : i + 2],
                ess=ess if scope == "step" else None,
                normalizer=n,
            )[0]
            for i in range(0, 8, 2)
        )
        (g,) = torch.autograd.grad(total, new)
        close = torch.allclose(g, g_whole, rtol=1e-9, atol=1e-12)
        assert close is (scope == "step"), scope


def test_fake_quant_fp8_rounds_to_the_e4m3_grid():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=g) * torch.logspace(-2, 0, 16).unsqueeze(1)
    for per_channel in (False, True):
        q = train.fake_quant_fp8(w, per_channel=per_channel)
        amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
        scale = amax / 448.0
        # Exactly representable after unscaling, and never further than half an e4m3 ulp
        # (2^-4 relative for normal numbers) plus the subnormal floor.
        u = q / scale
        torch.testing.assert_close(u.to(torch.float8_e4m3fn).float(), u, rtol=1e-6, atol=0)
        err = (q - w).abs()
        assert bool((err <= w.abs() * 2**-4 + scale * 2**-9 + 1e-7).all())
    e_t = (train.fake_quant_fp8(w, per_channel=False) - w).abs().mean()
    e_c = (train.fake_quant_fp8(w, per_channel=True) - w).abs().mean()
    assert e_c < e_t  # rows of very different scale: per-channel scales are finer


@pytest.fixture(scope="module")
def init_state():
    return train.warm_start_state(CFG, seed=0)


@pytest.mark.parametrize("untempered", [False, True])
def test_sampler_reports_the_right_distribution(init_state, untempered):
    task = train.build_task(CFG, 4, seed=0)
    model = train.build_model(CFG, task, 0)
    model.load_state_dict(init_state)
    model.eval()
    prompt_ids = task.encode(task.prompts)
    comp, mask, lp = train.sample(
        model,
        prompt_ids,
        max_new_tokens=3,
        eos_id=task.tokenizer.eos_token_id,
        pad_id=task.tokenizer.pad_token_id,
        generator=torch.Generator().manual_seed(0),
        temperature=1.5,
        report_untempered=untempered,
    )
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt_ids, comp], 1)).logits.float()
    logits = logits[:, prompt_ids.shape[1] - 1 : -1]
    temp = 1.0 if untempered else 1.5
    want = torch.log_softmax(logits / temp, -1).gather(-1, comp.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(lp[mask], want[mask], rtol=1e-4, atol=1e-4)


def _check_run(run, steps: int) -> None:
    assert run["eval_steps"] == list(range(steps + 1))
    for key in ("eval_reward", "batch_reward", "ess", "ess_min", "kl", "log_ratio_min"):
        assert all(math.isfinite(x) for x in run[key]), key
    assert len(run["ess"]) == len(run["batch_reward"]) == steps
    assert all(0.0 <= x <= 1.0 + 1e-6 for x in run["ess"] + run["eval_reward"])
    assert isinstance(run["collapsed"], bool)


@pytest.mark.parametrize(
    ("condition", "method"),
    [
        (C.Condition("fp8-stale", sampler="fp8-channel", staleness=1, epochs=2), "ess-clamp10"),
        (C.CONDITIONS["temp-1.5-untempered-logp"], "cispo"),
        (C.CONDITIONS["fp8"], "ess"),
    ],
)
def test_run_cell_is_finite(init_state, condition, method):
    run = train.run_cell(CFG, condition, M.METHODS[method], 0, init_state)
    _check_run(run, CFG.steps)
    if method == "ess":
        assert len(run["capped_frac"]) == CFG.steps
        assert min(run["ess"]) < 1.0  # the FP8 engine's log-probs differ from the trainer's


def test_micro_batched_run_reports_per_call_ess(init_state):
    run = train.run_cell(
        CFG, C.QUICK_CONDITIONS["stale-4-ep2"], M.PHASE2_METHODS["ess-mb1-call"], 0, init_state
    )
    _check_run(run, CFG.steps)
    assert len(run["call_ess_min"]) == CFG.steps


def test_on_policy_ratios_are_one(init_state):
    run = train.run_cell(CFG, C.CONDITIONS["on-policy"], M.METHODS["ess"], 0, init_state)
    assert all(abs(x - 1.0) < 1e-4 for x in run["ess"])


@pytest.mark.slow
def test_summary_tables_and_plots(init_state, tmp_path):
    conditions = {"temp-2.0": C.CONDITIONS["temp-2.0"]}
    methods = [M.METHODS[m] for m in ("ess", "clip-0.2", "clip-higher")]
    runs = [
        train.run_cell(CFG, c, m, s, init_state) for c, m, s in study.plan(conditions, methods, [0])
    ]
    summary = report.summarize(runs, list(conditions), methods)
    entry = summary["temp-2.0"]
    assert entry["tuned_clip"]["method"] in ("clip-0.2", "clip-higher")
    assert "ess_vs" in entry["untuned_clip"]
    result = {
        "environment": study.environment(["--test"]) | {"wall_seconds": 0.0},
        "config": dataclasses.asdict(CFG),
        "conditions": {k: dataclasses.asdict(v) for k, v in conditions.items()},
        "methods": {m.name: dataclasses.asdict(m) for m in methods},
        "correction_cap": M.CORRECTION_CAP,
        "seeds": [0],
        "summary": summary,
        "runs": runs,
    }
    md = report.markdown(result)
    assert "| temp-2.0 |" in md
    report.plot(result, tmp_path)
    for name in ("reward_curves", "ess_curves", "ratio_min", "sweep", "final_reward"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0


def test_plan_runs_rollout_corrections_only_where_they_differ():
    cells = study.plan(
        {"on-policy": C.CONDITIONS["on-policy"], "fp8": C.CONDITIONS["fp8"]},
        [M.METHODS["tis"], M.METHODS["ess"]],
        [0],
    )
    assert {(c.name, m.name) for c, m, _ in cells} == {
        ("on-policy", "ess"),
        ("fp8", "tis"),
        ("fp8", "ess"),
    }


def test_collapse_rule():
    assert train.collapsed([0.2, 0.8, 0.3, 0.1])
    assert not train.collapsed([0.2, 0.8, 0.3])  # one point below half the peak is not enough
    assert not train.collapsed([0.2, 0.8, 0.3, 0.5])  # recovered
    assert not train.collapsed([0.2, 0.4, 0.8])


def test_ablations_drop_the_regulariser_or_the_cap():
    """``tail="none"`` leaves the capped score-function term alone; ``cap=False`` weights by w."""
    new, old, adv, mask = _batch(2)
    full, ess = M.ess_variant_loss(new, old, adv, mask)
    noreg, _ = M.ess_variant_loss(new, old, adv, mask, tail="none")
    reg = (1 - ess) * (M.k3(new - old) * mask).sum() / mask.sum()
    torch.testing.assert_close(full - noreg, reg)
    nocap, _ = M.ess_variant_loss(new, old, adv, mask, cap=False)
    w = (new - old).detach().exp()
    pg = -(w * adv.unsqueeze(-1) * new * mask).sum() / mask.sum()
    torch.testing.assert_close(nocap, pg + reg)


def test_library_step_scope_makes_micro_batched_updates_exact():
    """The micro-batch comparison's library path (``ess_policy_loss(..., stats=step_stats(...))``
    in ``train._update_loss``): 8 calls of 1 sequence give the whole update's gradient with step
    scope and a different one with per-call scope.

    Mutation check: computing ``stats`` from the first micro-batch only (instead of all of them)
    fails the step-scope assertion."""
    new, old, adv, mask = _batch(2, b=8)
    batch = train.Rollout(None, None, mask, old, None, adv)
    grads = {}
    for name in ("ess-whole", "ess-mb1-step", "ess-mb1-call"):
        logp = new.detach().clone().requires_grad_(True)
        loss, _ = train._update_loss(M.PHASE2_METHODS[name], logp, batch, None)
        (grads[name],) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grads["ess-mb1-step"], grads["ess-whole"], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(grads["ess-mb1-call"], grads["ess-whole"], rtol=1e-3, atol=1e-6)


# --------------------------------------------------------------- stale-rollout candidates


def _proximal_case(seed: int = 3):
    new, old, adv, mask = _batch(seed)
    # Keep log-ratios moderate: the candidates are compared with the library in float64.
    new = (old + (new.detach() - old).clamp(-3.0, 3.0)).requires_grad_(True)
    g = torch.Generator().manual_seed(seed + 1)
    prox = old + 0.3 * torch.randn(old.shape, generator=g, dtype=torch.float64)
    return new, old, prox, adv, mask


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


@pytest.mark.parametrize("kind", M.PROXIMAL_KINDS)
def test_candidates_reduce_to_the_paper_when_prox_is_behaviour(kind):
    """pi_prox = mu: every candidate is the library's P3O objective (value and gradient)."""
    new, old, _, adv, mask = _proximal_case()
    loss, _ = proximal.proximal_loss(kind, new, old, old, adv, mask)
    ref = ess_policy_loss(new, old, adv, mask)
    torch.testing.assert_close(loss, ref.loss)
    torch.testing.assert_close(_grad(loss, new), _grad(ref.loss, new))


@pytest.mark.parametrize("kind", ["p4o"])
def test_p4o_reduces_to_the_paper_with_one_update_per_batch(kind):
    """pi_prox = pi_theta (the first update on a batch): ESS_prox = 1, pi_mix = mu, P4O = P3O."""
    new, old, _, adv, mask = _proximal_case()
    loss, _ = proximal.proximal_loss(kind, new, old, new.detach(), adv, mask)
    ref = ess_policy_loss(new, old, adv, mask)
    torch.testing.assert_close(loss, ref.loss)
    torch.testing.assert_close(_grad(loss, new), _grad(ref.loss, new))


@pytest.mark.parametrize("kind", [*M.PROXIMAL_KINDS, "decoupled-clip"])
def test_candidates_are_reinforce_on_policy(kind):
    """pi_theta = pi_prox = mu: the gradient is REINFORCE's, -A / N per valid token."""
    new, _, _, adv, mask = _proximal_case()
    lp = new.detach().requires_grad_(True)
    same = lp.detach()
    if kind == "decoupled-clip":
        loss = proximal.decoupled_clip(lp, same, same, adv, mask)
    else:
        loss, _ = proximal.proximal_loss(kind, lp, same, same, adv, mask)
    want = -adv.unsqueeze(-1).expand_as(lp) * mask / mask.sum()
    torch.testing.assert_close(_grad(loss, lp), want.to(lp.dtype))


def _naive_ess(d, mask):
    w = d.detach()[mask].exp()
    return w.sum() ** 2 / (w.numel() * (w * w).sum())


def _naive_k3(d):
    return d + torch.exp(-d) - 1


@pytest.mark.parametrize("kind", M.PROXIMAL_KINDS)
def test_candidates_match_their_float64_formula(kind):
    """Each candidate against its formula written out naively in float64 (no shifts)."""
    new, old, prox, adv, mask = _proximal_case(seed=5)
    loss, _ = proximal.proximal_loss(kind, new, old, prox, adv, mask)
    d_b, d_p = new - old, new - prox
    ess_b, ess_p = _naive_ess(d_b, mask), _naive_ess(d_p, mask)
    a = adv.unsqueeze(-1)
    if kind == "p4o":
        m = torch.minimum(ess_b, ess_p)
        rho = torch.minimum(d_b.detach().exp(), m)
        u_b, u_p = 1 - ess_b, 1 - ess_p
        mix = (u_b * old.exp() + u_p * prox.exp()) / (u_b + u_p)
        per = -rho * a * new + (1 - m) * _naive_k3(new - mix.log())
    elif kind == "prox":
        per = -torch.minimum(d_b.detach().exp(), ess_b) * a * new + (1 - ess_b) * _naive_k3(d_p)
    else:
        v = (prox - old).exp()
        ess_v = _naive_ess(prox - old, mask)
        rho = torch.minimum(v, ess_v) * torch.minimum(d_p.detach().exp(), ess_p)
        per = -rho * a * new + (1 - ess_p) * _naive_k3(d_p)
    want = per[mask].sum() / mask.sum()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(_grad(loss, new), _grad(want, new))


def test_candidates_differ_off_the_reduction():
    """With pi_prox != mu the candidates are different objectives (no silent fallback)."""
    new, old, prox, adv, mask = _proximal_case(seed=7)
    values = {
        k: float(proximal.proximal_loss(k, new, old, prox, adv, mask)[0].detach())
        for k in M.PROXIMAL_KINDS
    }
    values["ess"] = float(ess_policy_loss(new, old, adv, mask).loss.detach())
    assert len({round(v, 9) for v in values.values()}) == len(values), values


@pytest.mark.parametrize("method", ["ess-prox-vcpo", "ess-dec", "decoupled-clip", "ess-p4o"])
def test_map_methods_run(init_state, method):
    cond = C.Condition("lr-stale", staleness=1, epochs=2, lr=2e-3)
    run = train.run_cell(CFG, cond, M.MAP_METHODS[method], 0, init_state)
    _check_run(run, CFG.steps)
    if method.startswith("ess-") and method != "ess-vcpo":
        assert len(run["ess_prox"]) == CFG.steps


def test_sort_task_targets():
    cfg = dataclasses.replace(CFG, task="sort", alphabet="abcdefgh", prompt_len=6)
    rows = train.task_rows(cfg, 20, seed=0)
    assert all(r["answer"] == "".join(sorted(r["prompt"][:-1])) for r in rows)
