"""The fused implementation (ess_po/_fused.py, issue 24) against the plain-autograd reference.

Every other core test runs the default path (the fused one); these compare the two directly:
values, gradients and diagnostics on random inputs (NaN padding, empty rows, mixed dtypes,
bool / float / integer masks, every aggregation and scope), first and second derivatives by
gradcheck in float64, and torch.compile against eager over changing shapes.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

import ess_po
from ess_po import _fused, ess_policy_loss, ess_stats, ess_token_loss, step_stats
from ess_po.testing.batches import make_batch

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum"]
SCOPES = ["call", "sequence", "step"]
DIAGNOSTICS = [
    "ess",
    "ess_min",
    "kl_behavior",
    "ratio_mean",
    "ratio_max",
    "num_tokens",
    "capped_mass",
    "ratio_min",
]


def _paths(fn):
    """``fn()`` on the fused path and on the reference path."""
    before = _fused.ENABLED
    try:
        _fused.ENABLED = True
        fused = fn()
        _fused.ENABLED = False
        ref = fn()
    finally:
        _fused.ENABLED = before
    return fused, ref


def _inputs(B, T, seed, *, new_dtype, old_dtype, adv_shape, mask_kind, junk, empty_rows, rw):
    b = make_batch(B, T, seed=seed, staleness=0.7, adv_shape=adv_shape, empty_rows=empty_rows)
    lp, lo, adv, mask = b.logp_new.detach(), b.logp_old.clone(), b.advantages.clone(), b.mask
    lp = lp.clone()
    lp[-1, 0] = lo[-1, 0] - 60.0  # a valid token in the regulariser's linear tail
    g = torch.Generator().manual_seed(seed + 1)
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5 if rw else None
    if junk is not None:
        lp, lo = lp.clone(), lo.clone()
        lp[~mask], lo[~mask] = junk, -junk if junk == junk else junk
        if adv_shape == "BT":
            adv[~mask] = junk
        else:
            adv[: max(empty_rows, 0)] = junk
        if weights is not None:
            weights[~mask] = junk
    m = {"bool": mask, "float": mask.float(), "int": mask.long(), "float64": mask.double()}
    return (
        lp.to(new_dtype),
        lo.to(old_dtype),
        adv,
        m[mask_kind],
        None if weights is None else weights.to(old_dtype),
    )


def _run_loss(lp, lo, adv, mask, rw, mode, scope):
    x = lp.clone().requires_grad_(True)
    kwargs = dict(loss_agg_mode=mode, rollout_weights=rw)
    if scope == "step":
        valid = mask if mask.dtype == torch.bool else mask != 0
        kwargs["stats"] = step_stats([((lp.double() - lo.double())[:2], valid[:2])])
    else:
        kwargs["ess_scope"] = scope
    out = ess_policy_loss(x, lo, adv, mask, **kwargs)
    (g,) = torch.autograd.grad(out.loss, x)
    return out, g


def _assert_same(fused, ref, g_f, g_r, tol) -> None:
    rtol, atol = tol
    torch.testing.assert_close(fused.loss, ref.loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(g_f, g_r, rtol=rtol, atol=atol)
    for name in ("policy_loss", "regularizer_loss", *DIAGNOSTICS):
        torch.testing.assert_close(getattr(fused, name), getattr(ref, name), rtol=rtol, atol=atol)
    # Capped tokens are counted in shifted units (e > cap) by the fused path, w > ESS by the
    # reference: a token within a rounding step of the cap may count on one side only.
    n = max(ref.num_tokens.item(), 1.0)
    assert abs(fused.capped_frac.item() - ref.capped_frac.item()) <= 2.0 / n + 1e-6


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("mask_kind", ["bool", "float", "int"])
@pytest.mark.parametrize("adv_shape", ["B", "B1", "BT"])
def test_fused_matches_reference_float64(mode, scope, mask_kind, adv_shape) -> None:
    args = _inputs(
        6,
        23,
        seed=11,
        new_dtype=torch.float64,
        old_dtype=torch.float64,
        adv_shape=adv_shape,
        mask_kind=mask_kind,
        junk=float("nan"),
        empty_rows=2,
        rw=True,
    )
    (f, gf), (r, gr) = _paths(lambda: _run_loss(*args, mode, scope))
    _assert_same(f, r, gf, gr, (1e-12, 1e-14))
    assert torch.isfinite(f.loss) and torch.isfinite(gf).all()


@pytest.mark.parametrize(
    "new_dtype, old_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float64),
    ],
)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("junk", [None, float("nan"), float("inf"), -float("inf"), 1e30])
def test_fused_matches_reference_mixed_dtypes(new_dtype, old_dtype, scope, junk) -> None:
    args = _inputs(
        5,
        37,
        seed=4,
        new_dtype=new_dtype,
        old_dtype=old_dtype,
        adv_shape="B",
        mask_kind="float",
        junk=junk,
        empty_rows=1,
        rw=False,
    )
    (f, gf), (r, gr) = _paths(lambda: _run_loss(*args, "token-mean", scope))
    assert f.loss.dtype == r.loss.dtype and gf.dtype == gr.dtype == new_dtype
    wide = torch.float64 in (new_dtype, old_dtype)
    _assert_same(f, r, gf, gr, (1e-12, 1e-14) if wide else (2e-5, 1e-6))


@pytest.mark.parametrize("scope", ["call", "sequence"])
@pytest.mark.parametrize("rw", [False, True])
def test_token_terms_and_every_output_gradient_match(scope, rw) -> None:
    """ess_token_loss's three (B, T) outputs, each with its own non-uniform upstream gradient
    (not the expanded scalars the aggregation gives), alone and together."""
    lp, lo, adv, mask, weights = _inputs(
        4,
        9,
        seed=3,
        new_dtype=torch.float64,
        old_dtype=torch.float64,
        adv_shape="B",
        mask_kind="bool",
        junk=float("nan"),
        empty_rows=1,
        rw=rw,
    )
    up = torch.randn(3, 4, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def run():
        x = lp.clone().requires_grad_(True)
        tok = ess_token_loss(x, lo, adv, mask, ess_scope=scope, rollout_weights=weights)
        grads = []
        for outputs in ([0], [1], [2], [0, 1, 2], [1, 2]):
            terms = (tok.loss, tok.policy_loss, tok.regularizer_loss)
            s = sum((terms[i] * up[i]).sum() for i in outputs)
            grads.append(torch.autograd.grad(s, x, retain_graph=True)[0])
        return tok, grads

    (f, gf), (r, gr) = _paths(run)
    for name in ("loss", "policy_loss", "regularizer_loss"):
        torch.testing.assert_close(getattr(f, name), getattr(r, name), rtol=1e-12, atol=1e-14)
    for a, b in zip(gf, gr, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        assert (a[~mask] == 0).all()


@pytest.mark.parametrize("where", ["logp_new", "logp_old", "advantages"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_at_valid_positions_shows_alike(where, value) -> None:
    b = make_batch(3, 5, seed=1, dtype=torch.float32)
    lp, lo, adv = b.logp_new.detach().clone(), b.logp_old.clone(), b.advantages.clone()
    {"logp_new": lp, "logp_old": lo, "advantages": adv}[where][1] = value

    def run():
        x = lp.clone().requires_grad_(True)
        tok = ess_token_loss(x, lo, adv, b.mask)
        return tok, torch.autograd.grad(tok.loss.sum(), x)[0]

    (f, gf), (r, gr) = _paths(run)
    assert not torch.isfinite(f.loss.sum())
    valid = b.mask
    assert torch.equal(torch.isfinite(f.loss)[valid], torch.isfinite(r.loss)[valid])
    assert torch.equal(torch.isfinite(gf)[valid], torch.isfinite(gr)[valid])
    assert (gf[~valid] == 0).all() == (gr[~valid] == 0).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scope", ["call", "sequence"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_log_ratio_at_a_valid_position_every_mode(mode, scope, value) -> None:
    """A NaN or inf log ratio at one valid position, through ess_policy_loss (the token modes
    take the fused sums path): the loss and every diagnostic read as the reference's (NaN where
    it is NaN), and masked positions still get an exact 0 gradient even though the ESS, and so
    1 - ESS, is NaN."""
    b = make_batch(3, 6, seed=2, dtype=torch.float32, empty_rows=0)
    lp, lo = b.logp_new.detach().clone(), b.logp_old.clone()
    lp[1, 0] = value
    mask = b.mask.clone()
    mask[1, 0], mask[:, -1] = True, False  # the bad token is valid; some positions are masked

    def run():
        x = lp.clone().requires_grad_(True)
        out = ess_policy_loss(x, lo, b.advantages, mask, loss_agg_mode=mode, ess_scope=scope)
        return out, torch.autograd.grad(out.loss, x)[0]

    (f, gf), (r, gr) = _paths(run)
    assert torch.equal(torch.isfinite(f.loss), torch.isfinite(r.loss))
    for name in ("ess", "ess_min", "capped_mass", "kl_behavior", "ratio_mean", "ratio_max"):
        a, e = getattr(f, name), getattr(r, name)
        torch.testing.assert_close(a, e, rtol=2e-5, atol=1e-6, equal_nan=True, msg=name)
    assert (gf[~mask] == 0).all() and (gr[~mask] == 0).all()
    assert torch.equal(torch.isfinite(gf)[mask], torch.isfinite(gr)[mask])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_ess_clamps_rounding_into_its_range(dtype) -> None:
    """The single-group ESS ``s1^2 / (n s2)`` is clamped to ``[1/n, 1]`` as the log-space
    ``ESSStats.log_ess`` is: statistics whose rounding lands a step outside the range (sums in
    different orders over more than 2^24 tokens) read as the bound, and NaN stays NaN."""
    eps = torch.finfo(dtype).eps

    def ess(s1: float, s2: float, n: float) -> float:
        t = lambda v: torch.tensor(v, dtype=dtype)  # noqa: E731
        raw = _fused._Raw(t(0.0), t(n), t(s1), t(s2))
        return _fused._linear_ess(raw, t(s1), t(n), t(n).reciprocal()).item()

    n = 1000.0
    assert ess(1.0, 1.0 + 4 * eps, n) == torch.tensor(1 / n, dtype=dtype).item()  # below 1/n
    assert ess(n, n * (1 - 4 * eps), n) == 1.0  # above 1
    assert math.isnan(ess(float("nan"), 1.0, n))
    assert ess(1.0, 0.0, 1.0) == 1.0  # no tokens: s1 and the count n clamped to 1, s2 = 0


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0), (2, 4)])
@pytest.mark.parametrize("scope", ["call", "sequence"])
def test_empty_and_fully_masked(shape, scope) -> None:
    lp = torch.zeros(shape)
    mask = torch.zeros(shape, dtype=torch.bool)
    (f, gf), (r, gr) = _paths(
        lambda: _run_loss(
            lp, torch.ones(shape), torch.ones(shape[0]), mask, None, "token-mean", scope
        )
    )
    _assert_same(f, r, gf, gr, (0, 0))
    assert f.loss.item() == 0.0 and f.ess.item() == 1.0


def test_float_int_and_bool_masks_give_the_same_bits() -> None:
    args = dict(seed=7, new_dtype=torch.float32, old_dtype=torch.float32, adv_shape="B")
    outs = []
    for kind in ("bool", "float", "int", "float64"):
        lp, lo, adv, mask, _ = _inputs(
            5, 31, **args, mask_kind=kind, junk=None, empty_rows=1, rw=False
        )
        outs.append(_run_loss(lp, lo, adv, mask, None, "seq-mean-token-mean", "call"))
    (first, g0), rest = outs[0], outs[1:]
    for out, g in rest:
        assert torch.equal(g, g0)
        for name in first._fields:
            assert torch.equal(getattr(out, name), getattr(first, name)), name


def test_non_binary_float_mask_means_nonzero() -> None:
    """mask != 0 is the rule: 0.5, -1, inf and NaN are valid, -0.0 is not (as the reference)."""
    b = make_batch(2, 6, seed=5, dtype=torch.float32)
    mask = torch.tensor([[0.5, -1.0, float("inf"), float("nan"), -0.0, 0.0], [1.0] * 6])
    (f, gf), (r, gr) = _paths(
        lambda: _run_loss(
            b.logp_new.detach(), b.logp_old, b.advantages, mask, None, "token-mean", "call"
        )
    )
    assert f.num_tokens.item() == 10
    _assert_same(f, r, gf, gr, (2e-5, 1e-6))


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_and_gradgradcheck_float64(mode) -> None:
    """First and second derivatives against finite differences. ESS and the cap are
    stop-gradient constants, which finite differences would move: so the ESS is fixed (step
    scope) and the advantages are 0 (the regulariser alone is then the whole function). Masked
    positions hold NaN. (The linear tail, whose e^50 slope defeats finite differences, is
    covered by the Hessian test below.)"""
    b = make_batch(3, 5, seed=2, staleness=0.8, empty_rows=1)
    lo = b.logp_old.clone()
    x0 = b.logp_new.detach().clone()
    stats = ess_stats(x0 - lo, b.mask)
    lo[~b.mask] = float("nan")
    zero = torch.zeros(3, dtype=torch.float64)

    def loss(x):
        return ess_policy_loss(x, lo, zero, b.mask, stats=stats, loss_agg_mode=mode).loss

    def terms(x):
        tok = ess_token_loss(x, lo, zero, b.mask, stats=stats)
        return tok.loss, tok.policy_loss, tok.regularizer_loss

    x = x0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (x,))
    assert torch.autograd.gradgradcheck(loss, (x,))
    assert torch.autograd.gradcheck(terms, (x,))
    assert torch.autograd.gradgradcheck(terms, (x,))


@pytest.mark.parametrize("scope", ["call", "sequence"])
def test_hessian_fused_equals_reference(scope) -> None:
    b = make_batch(3, 6, seed=6, staleness=2.0)
    lp0 = b.logp_new.detach().clone()
    lp0[0, 0] = b.logp_old[0, 0] - 60.0  # into the linear tail: second derivative 0 there

    def f(x):
        return ess_policy_loss(x, b.logp_old, b.advantages, b.mask, ess_scope=scope).loss

    h_f, h_r = _paths(lambda: torch.autograd.functional.hessian(f, lp0))
    assert h_f.abs().sum() > 0
    torch.testing.assert_close(h_f, h_r, rtol=1e-10, atol=1e-12)


def test_fused_module_has_no_host_sync_calls() -> None:
    """The static guard of test_core_numerics, for the fused module."""
    tree = ast.parse((Path(ess_po.__file__).parent / "_fused.py").read_text())
    forbidden = {"item", "tolist", "cpu", "numpy", "nonzero", "tensor", "as_tensor"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in forbidden:
                found.append(node.lineno)
            constant = all(isinstance(a, ast.Constant) for a in node.args)
            if isinstance(f, ast.Name) and f.id in ("bool", "float", "int") and not constant:
                found.append(node.lineno)
    assert not found, found


def test_fused_saves_less_for_backward() -> None:
    """Memory, not time: the fused path keeps two (B, T) tensors of the compute dtype for
    backward (besides its inputs), the reference more."""
    b = make_batch(8, 64, seed=0, dtype=torch.float32)
    lp = b.logp_new.detach().requires_grad_(True)

    def saved():
        seen = {}
        inputs = {lp.untyped_storage().data_ptr(), b.logp_old.untyped_storage().data_ptr()}
        inputs.add(b.mask.untyped_storage().data_ptr())

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in inputs:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ess_policy_loss(lp, b.logp_old, b.advantages, b.mask)
        return sum(seen.values())

    fused, ref = _paths(saved)
    assert fused <= 2 * 8 * 64 * 4 + 1024 < ref


@pytest.mark.slow
@pytest.mark.parametrize("mask_kind", ["bool", "float", "int"])
def test_compiled_equals_eager_changing_shapes(mask_kind) -> None:
    torch._dynamo.reset()

    def f(lp, lo, adv, mask, scope, mode):
        out = ess_policy_loss(lp, lo, adv, mask, ess_scope=scope, loss_agg_mode=mode)
        return out.loss, out.ess, out.capped_mass, out.ratio_min, out.kl_behavior

    compiled = torch.compile(f, dynamic=None)
    for (B, T), scope, mode in (
        ((4, 16), "call", "token-mean"),
        ((6, 24), "call", "token-mean"),
        ((5, 33), "call", "token-mean"),
        ((6, 24), "sequence", "seq-mean-token-mean"),
        ((7, 9), "sequence", "seq-mean-token-mean"),
    ):
        b = make_batch(B, T, seed=B, dtype=torch.float32, empty_rows=1)
        mask = {"bool": b.mask, "float": b.mask.float(), "int": b.mask.long()}[mask_kind]
        lo = b.logp_old.clone()
        lo[~b.mask] = float("nan")
        results = []
        for fn in (compiled, f):
            x = b.logp_new.detach().clone().requires_grad_(True)
            vals = fn(x, lo, b.advantages, mask, scope, mode)
            vals[0].backward()
            results.append((vals, x.grad))
        (vc, gc), (ve, ge) = results
        for a, e in zip(vc, ve, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-7)
        assert (gc[~b.mask] == 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("mask_kind", ["float", "int"])
def test_compiled_backward_saves_no_bool_mask(mask_kind) -> None:
    """Compiled with a float or integer mask, the backward keeps float tensors only: the
    partitioner would otherwise save a fresh bool ``mask != 0``, which Inductor's CPU code writes
    and reads several times slower than floats (``ess_po._fused._materialized``)."""
    torch._dynamo.reset()
    b = make_batch(4, 64, seed=3, dtype=torch.float32)
    mask = b.mask.float() if mask_kind == "float" else b.mask.long()
    compiled = torch.compile(
        lambda lp, lo, adv, m: ess_policy_loss(lp, lo, adv, m).loss, fullgraph=True
    )
    lp = b.logp_new.detach().requires_grad_(True)
    compiled(lp, b.logp_old, b.advantages, mask)
    saved = []

    def pack(t):
        saved.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = compiled(lp, b.logp_old, b.advantages, mask)
    loss.backward()
    assert saved and torch.bool not in saved, saved
    assert torch.isfinite(lp.grad).all() and (lp.grad[~b.mask] == 0).all()
