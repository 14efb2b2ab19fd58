"""The core in the precisions and edge cases production runs (issue 9).

Each test names the item of issue 9 it covers. All of them failed on the hand-fused kernel this
module replaced (commit edacc07), except these cases, which guard behaviour that already held:
(B, T) advantages on masked rows, ±inf at valid positions (but NaN, and -inf in logp_old,
failed), fp16 below overflow, Python-number normalizers, and constants requiring grad beside a
logp_new that requires grad.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ess_po
from ess_po import effective_sample_size, ess_policy_loss, ess_stats, ess_token_loss
from ess_po.testing.batches import make_batch
from ess_po.testing.reference import naive_ess_loss, reinforce_loss

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum"]
SCOPES = ["call", "sequence"]
ADV_SHAPES = ["B", "B1", "BT"]


def _grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, x)
    return g


# --- item 1: autocast ---------------------------------------------------------------------------


@pytest.mark.parametrize("scope", SCOPES)
def test_autocast_bf16_on_policy_is_exactly_reinforce(scope: str) -> None:
    """Under CPU bf16 autocast, on-policy data gives ESS 1, nothing capped, REINFORCE exactly.
    (The fused kernel's vecdot ran in bf16: ess_min 0.983, 47% capped.)"""
    g = torch.Generator().manual_seed(0)
    lp = (-torch.rand(8, 1024, generator=g) * 3).requires_grad_(True)
    adv = torch.randn(8, generator=g)
    mask = torch.rand(8, 1024, generator=g) > 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ess_policy_loss(lp, lp.detach().clone(), adv, mask, ess_scope=scope)
    assert out.ess.item() == 1.0 and out.ess_min.item() == 1.0
    assert out.capped_frac.item() == 0.0 and out.capped_mass.item() == 0.0
    assert out.loss.dtype == torch.float32
    ref = reinforce_loss(lp, adv, mask)
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=0)
    assert torch.equal(_grad(out.loss, lp), _grad(ref, lp))


def test_autocast_off_policy_matches_no_autocast() -> None:
    b = make_batch(6, 40, seed=3, dtype=torch.float32)
    plain = ess_policy_loss(b.logp_new, b.logp_old, b.advantages, b.mask, ess_scope="sequence")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = ess_policy_loss(b.logp_new, b.logp_old, b.advantages, b.mask, ess_scope="sequence")
    for name in plain._fields:
        assert torch.equal(getattr(auto, name), getattr(plain, name)), name


# --- item 2: mixed dtypes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "new_dtype, old_dtype, loss_dtype",
    [
        (torch.bfloat16, torch.float32, torch.float32),
        (torch.float16, torch.float32, torch.float32),
        (torch.float32, torch.bfloat16, torch.float32),
        (torch.float32, torch.float64, torch.float64),
        (torch.bfloat16, torch.float64, torch.float64),
    ],
)
def test_mixed_input_dtypes(new_dtype, old_dtype, loss_dtype) -> None:
    b = make_batch(5, 12, seed=4)
    lp = b.logp_new.detach().to(new_dtype).requires_grad_(True)
    lo = b.logp_old.to(old_dtype)
    adv = b.advantages.float()
    out = ess_policy_loss(lp, lo, adv, b.mask)
    assert out.loss.dtype == loss_dtype
    lp64 = lp.detach().double().requires_grad_(True)
    ref = naive_ess_loss(lp64, lo.double(), adv.double(), b.mask)
    torch.testing.assert_close(out.loss.double(), ref, rtol=2e-5, atol=1e-6)
    g = _grad(out.loss, lp)
    assert g.dtype == new_dtype
    tol = dict(rtol=1.6e-2, atol=1e-4) if new_dtype != torch.float32 else {}
    torch.testing.assert_close(g.double(), _grad(ref, lp64), **tol)


# --- item 3: NaN --------------------------------------------------------------------------------


def _adv(b, shape: str) -> torch.Tensor:
    B, T = b.mask.shape
    base = b.advantages.reshape(B, -1)[:, :1]
    return {"B": base.reshape(B), "B1": base, "BT": base.expand(B, T).clone()}[shape]


@pytest.mark.parametrize("adv_shape", ADV_SHAPES)
@pytest.mark.parametrize("scope", SCOPES)
def test_nan_advantage_on_masked_row_touches_nothing(adv_shape: str, scope: str) -> None:
    """GRPO gives 0/0 = NaN advantages to padding rows; they must not reach loss or gradient.
    (The kernel gave a NaN gradient row for (B,) advantages.)"""
    b = make_batch(5, 8, seed=9, empty_rows=2)
    adv = _adv(b, adv_shape)
    clean = ess_policy_loss(b.logp_new, b.logp_old, adv, b.mask, ess_scope=scope)
    g_clean = _grad(clean.loss, b.logp_new)
    dirty_adv = adv.clone()
    dirty_adv[:2] = float("nan")
    dirty = ess_policy_loss(b.logp_new, b.logp_old, dirty_adv, b.mask, ess_scope=scope)
    g = _grad(dirty.loss, b.logp_new)
    assert torch.equal(dirty.loss, clean.loss)
    assert torch.equal(g, g_clean)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("adv_shape", ADV_SHAPES)
def test_nan_advantage_on_valid_row_shows_in_loss(adv_shape: str) -> None:
    """A NaN at a valid position must reach the loss value so the host's NaN guard fires.
    (The kernel returned a finite loss with a NaN gradient.)"""
    b = make_batch(4, 6, seed=2)
    adv = _adv(b, adv_shape).clone()
    adv[1] = float("nan")
    out = ess_policy_loss(b.logp_new, b.logp_old, adv, b.mask)
    assert torch.isnan(out.loss)


@pytest.mark.parametrize("where", ["logp_new", "logp_old", "rollout_weights"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_at_valid_position_shows_in_loss(where: str, value: float) -> None:
    """(Eager, the kernel dropped NaN log-probs with nan_to_num/nansum.)"""
    b = make_batch(3, 5, seed=1)
    b.mask[:] = True
    lp, lo = b.logp_new.detach().clone(), b.logp_old.clone()
    rw = torch.ones(3, 5, dtype=torch.float64)
    {"logp_new": lp, "logp_old": lo, "rollout_weights": rw}[where][1, 2] = value
    out = ess_policy_loss(lp.requires_grad_(True), lo, b.advantages, b.mask, rollout_weights=rw)
    assert not torch.isfinite(out.loss), out.loss


# --- item 4: fp16 overflow ----------------------------------------------------------------------


def test_fp16_gradient_overflows_to_inf_and_grad_scaler_backs_off() -> None:
    """fp32 parameters, fp16 log-probs (an AMP activation), a GradScaler: the scaled gradient
    overflows fp16 and must arrive as inf, so the scaler skips the step and halves its scale.
    (The kernel saturated at 65504: the scaler stepped with a silently wrong gradient.)"""
    theta = torch.nn.Parameter(torch.full((2, 4), -1.0))
    opt = torch.optim.SGD([theta], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    adv = torch.tensor([60.0, -60.0])
    mask = torch.ones(2, 4, dtype=torch.bool)
    logp_new = theta.half()  # true scaled gradient -60 * 65536 = -3.9e6, beyond fp16
    out = ess_policy_loss(logp_new, logp_new.detach().float(), adv, mask, loss_agg_mode="token-sum")
    scaler.scale(out.loss).backward()
    assert torch.isinf(theta.grad).all()
    before = theta.detach().clone()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(theta.detach(), before)  # step skipped
    assert scaler.get_scale() == 2.0**15  # backed off


def test_fp16_gradient_below_overflow_is_exact() -> None:
    lp = torch.full((1, 3), -1.0, dtype=torch.float16, requires_grad=True)
    out = ess_policy_loss(
        lp, lp.detach(), torch.tensor([3.0]), torch.ones(1, 3), loss_agg_mode="token-sum"
    )
    (out.loss * 1024).backward()
    assert torch.equal(lp.grad, torch.full((1, 3), -3072.0, dtype=torch.float16))


# --- item 5: empty inputs -----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scope", SCOPES)
def test_empty_batch(shape, mode: str, scope: str) -> None:
    lp = torch.zeros(shape, requires_grad=True)
    adv = torch.ones(shape[0])
    out = ess_policy_loss(
        lp, torch.zeros(shape), adv, torch.ones(shape), loss_agg_mode=mode, ess_scope=scope
    )
    assert out.loss.item() == 0.0
    assert out.ess.item() == 1.0 and out.ess_min.item() == 1.0
    assert out.num_tokens.item() == 0
    for name, value in out._asdict().items():
        assert torch.isfinite(value).all(), name
    g = _grad(out.loss, lp)
    assert g.shape == shape
    assert effective_sample_size(torch.zeros(shape)).item() == 1.0
    assert effective_sample_size(torch.zeros(shape), dim=-1).shape == shape[:1]


# --- item 6: double backward --------------------------------------------------------------------


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_hessian_matches_float64_reference(scope: str, mode: str) -> None:
    """ESS and the cap are constants (stop-gradient); the second derivative is the
    regulariser's (1 - ESS) e^{-d} on the diagonal. (The kernel returned all zeros.)"""
    b = make_batch(3, 4, seed=6, staleness=0.8)
    lp0 = b.logp_new.detach()

    def ours(x):
        return ess_policy_loss(
            x, b.logp_old, b.advantages, b.mask, ess_scope=scope, loss_agg_mode=mode
        ).loss

    def ref(x):
        return naive_ess_loss(
            x, b.logp_old, b.advantages, b.mask, ess_scope=scope, loss_agg_mode=mode
        )

    h = torch.autograd.functional.hessian(ours, lp0)
    h_ref = torch.autograd.functional.hessian(ref, lp0)
    assert h.abs().sum() > 0
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-12)


# --- item 7: validation -------------------------------------------------------------------------


def _good(B: int = 2, T: int = 3):
    return torch.zeros(B, T, requires_grad=True), torch.zeros(B, T), torch.ones(B), torch.ones(B, T)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_normalizer_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match=r"normalizer must be a finite positive number"):
        ess_policy_loss(*_good(), normalizer=bad)


@pytest.mark.parametrize("n", [np.int64(10), np.int32(10), np.float64(10.0), 10, 10.0])
def test_numpy_and_python_normalizers_accepted(n) -> None:
    out = ess_policy_loss(*_good(), normalizer=n)
    ref = ess_policy_loss(*_good(), normalizer=torch.tensor(10.0))
    torch.testing.assert_close(out.loss, ref.loss)


@pytest.mark.parametrize("which", ["logp_old", "advantages", "rollout_weights"])
@pytest.mark.parametrize("new_requires_grad", [True, False])
def test_constants_requiring_grad_are_detached(which: str, new_requires_grad: bool) -> None:
    lp, lo, adv, mask = _good()
    lp = lp.detach().requires_grad_(new_requires_grad)
    rw = torch.ones(2, 3)
    leaf = {"logp_old": lo, "advantages": adv, "rollout_weights": rw}[which].requires_grad_(True)
    out = ess_policy_loss(lp, lo + 0.1, adv, mask, rollout_weights=rw)
    assert out.loss.requires_grad == new_requires_grad
    if new_requires_grad:
        out.loss.backward()
        assert lp.grad is not None and leaf.grad is None


def test_effective_sample_size_input_errors() -> None:
    with pytest.raises(TypeError, match=r"log_ratio must be a torch.Tensor, got list"):
        effective_sample_size([0.0, 1.0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"mask must be a torch.Tensor or None, got list"):
        effective_sample_size(torch.zeros(2), [True, False])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"dim=2 is out of range for log_ratio with 2 dim.*dim=-1"):
        effective_sample_size(torch.zeros(2, 3), dim=2)
    with pytest.raises(TypeError, match=r"log_ratio must be a torch.Tensor"):
        ess_stats("x")  # type: ignore[arg-type]


# --- item 8: no host synchronisation ------------------------------------------------------------


@pytest.fixture
def no_torch_tensor(monkeypatch):
    """torch.tensor / as_tensor build a tensor from host data: a host-to-device copy on CUDA."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.tensor/as_tensor called on the loss path")

    monkeypatch.setattr(torch, "tensor", refuse)
    monkeypatch.setattr(torch, "as_tensor", refuse)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("normalizer", [None, 7, 7.5, np.int64(7), "tensor"])
def test_loss_runs_on_meta_device(mode, scope, normalizer, no_torch_tensor) -> None:
    """Forward and backward on ``meta`` tensors, which hold no values: any ``.item()``,
    ``bool(tensor)``, ``.tolist()`` or value-dependent branch raises. With torch.tensor
    patched out, any host-to-device scalar copy fails too."""
    if normalizer is not None and mode == "token-sum":
        pytest.skip("token-sum takes no normalizer")
    if normalizer == "tensor":
        normalizer = torch.ones((), device="meta")
    B, T = 4, 6
    lp = torch.empty(B, T, device="meta", dtype=torch.bfloat16, requires_grad=True)
    lo = torch.empty(B, T, device="meta")
    adv = torch.empty(B, device="meta")
    mask = torch.empty(B, T, device="meta", dtype=torch.bool)
    rw = torch.empty(B, T, device="meta")
    kwargs = dict(loss_agg_mode=mode, ess_scope=scope, normalizer=normalizer, rollout_weights=rw)
    out = ess_policy_loss(lp, lo, adv, mask, **kwargs)
    out.loss.backward()
    assert lp.grad.shape == (B, T) and lp.grad.device.type == "meta"
    for value in out.metrics().values():
        assert value.device.type == "meta"
    tok = ess_token_loss(lp, lo, adv, mask, ess_scope=scope)
    assert tok.loss.shape == (B, T)
    if scope == "call":
        stats = ess_stats(lo, mask)
        step = kwargs | {"ess_scope": "step"}
        ess_policy_loss(lp, lo, adv, mask, stats=stats, **step).loss.backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scope", SCOPES)
def test_no_sync_on_cuda(scope: str) -> None:
    b = make_batch(4, 16, seed=0, dtype=torch.float32)
    lp = b.logp_new.detach().cuda().requires_grad_(True)
    args = (b.logp_old.cuda(), b.advantages.cuda(), b.mask.cuda())
    stats = ess_stats(lp.detach() - args[0], args[2]) if scope == "call" else None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for normalizer in (None, 17, 17.0, torch.tensor(17.0, device="cuda")):
            out = ess_policy_loss(lp, *args, normalizer=normalizer, ess_scope=scope)
            out.loss.backward()
            ess_policy_loss(lp, *args, normalizer=normalizer, stats=stats).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


_LOSS_PATH = ["ess.py", "objective.py", "aggregation.py", "loss.py"]
_FORBIDDEN_CALLS = {"item", "tolist", "cpu", "numpy", "nonzero", "tensor", "as_tensor"}


def test_loss_path_sources_have_no_host_sync_calls() -> None:
    """Static guard beside the meta run: no ``.item()``, ``.tolist()``, ``torch.tensor(...)``,
    ``bool(...)``/``float(...)``/``int(...)`` of anything but metadata in the loss-path modules.
    (Validation helpers that run only under ``check_values=True`` live in _validation.py.)"""
    root = Path(ess_po.__file__).parent
    found = []
    for name in _LOSS_PATH:
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in _FORBIDDEN_CALLS:
                found.append(f"{name}:{node.lineno} .{f.attr}(...)")
            if isinstance(f, ast.Name) and f.id == "bool" and node.args:
                found.append(f"{name}:{node.lineno} bool(...)")
    assert not found, found


# --- item 9: diagnostics ------------------------------------------------------------------------


@pytest.mark.parametrize("scope", SCOPES)
def test_capped_mass_and_ratio_min_match_naive(scope: str) -> None:
    b = make_batch(5, 9, seed=8, staleness=0.6, empty_rows=1)
    out = ess_policy_loss(b.logp_new, b.logp_old, b.advantages, b.mask, ess_scope=scope)
    d = (b.logp_new - b.logp_old).detach()
    w_all = d.exp()
    if scope == "call":
        ess = (w_all[b.mask].sum() ** 2 / (b.mask.sum() * (w_all[b.mask] ** 2).sum())).expand(5, 9)
    else:
        rows = []
        for r in range(5):
            w = w_all[r][b.mask[r]]
            rows.append(w.sum() ** 2 / (len(w) * (w**2).sum()) if len(w) else torch.tensor(1.0))
        ess = torch.stack(rows).double().unsqueeze(-1).expand(5, 9)
    w, e = w_all[b.mask], ess[b.mask]
    rho = torch.minimum(w, e)
    torch.testing.assert_close(out.capped_mass, ((w - rho).sum() / w.sum()).float())
    torch.testing.assert_close(out.ratio_min, w.min().float())
    assert out.capped_mass.item() > 0


def test_diagnostics_near_on_policy() -> None:
    """Ratios a rounding step from 1: capped_frac may be large, capped_mass is ~0."""
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(8, 256, generator=g) * 3
    lo = lp + 1e-6 * torch.randn(8, 256, generator=g)
    out = ess_policy_loss(lp, lo, torch.ones(8), torch.ones(8, 256))
    assert out.capped_mass.item() < 1e-6
    on = ess_policy_loss(lp, lp, torch.ones(8), torch.ones(8, 256))
    assert on.capped_mass.item() == 0.0 and on.ratio_min.item() == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scope", SCOPES)
def test_diagnostics_do_not_overflow(dtype, scope: str) -> None:
    lp = torch.zeros(2, 4, dtype=dtype)
    lo = torch.zeros(2, 4, dtype=dtype)
    lo[0, 0] = -200.0  # w = e^200: beyond float32
    lo[1, 1] = 300.0  # w = e^-300: below float32
    out = ess_policy_loss(lp, lo, torch.zeros(2, dtype=dtype), torch.ones(2, 4))
    assert 0.99 < out.capped_mass.item() <= 1.0
    assert out.ratio_min.item() == 0.0
    for name, value in out._asdict().items():
        assert torch.isfinite(value), name


def test_docstrings_say_what_the_code_does() -> None:
    assert "(world, 4)" in ess_po.all_reduce_stats.__doc__
    assert "float64" in effective_sample_size.__doc__
    assert "non-finite" in ess_stats.__doc__
    assert effective_sample_size(torch.zeros(3, dtype=torch.float64)).dtype == torch.float64
    lw = torch.tensor([0.0, float("nan"), float("inf"), 0.0])
    assert ess_stats(lw).count.item() == 2


# --- item 10: the regulariser's tail ------------------------------------------------------------


def test_linear_tail_constant_is_public_and_used() -> None:
    L = ess_po.REGULARIZER_LINEAR_TAIL
    assert isinstance(L, float)
    assert "REGULARIZER_LINEAR_TAIL" in ess_policy_loss.__doc__
    # Below -L the regulariser's gradient is the constant 1 - e^L (per unit weight).
    d = torch.tensor([[-L - 5.0, -L - 1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    out = ess_policy_loss(
        d,
        torch.zeros(1, 3, dtype=torch.float64),
        torch.zeros(1, dtype=torch.float64),
        torch.ones(1, 3),
        loss_agg_mode="token-sum",
    )
    g = _grad(out.loss, d)[0]
    one_minus_ess = 1 - out.ess.double()
    torch.testing.assert_close(
        g[:2], (one_minus_ess * (1 - math.exp(L))).expand(2), rtol=1e-6, atol=0
    )
    assert out.ratio_min.item() == pytest.approx(math.exp(-L - 5.0), rel=1e-5)


# --- items 3 and 5 as a property: whatever masked positions hold, nothing changes -------------

_JUNK = st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.0, 7.0])


@settings(deadline=None, max_examples=40)
@given(
    st.integers(0, 4),
    st.integers(0, 6),
    st.sampled_from(ADV_SHAPES),
    st.sampled_from(SCOPES),
    st.sampled_from(MODES),
    _JUNK,
    _JUNK,
    st.integers(0, 2**31 - 1),
)
def test_masked_junk_never_matters(B, T, adv_shape, scope, mode, junk_a, junk_b, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    lo = lp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.4
    adv = {"B": (B,), "B1": (B, 1), "BT": (B, T)}[adv_shape]
    adv = torch.randn(*adv, generator=g, dtype=torch.float64)
    rw = torch.rand(B, T, generator=g, dtype=torch.float64)

    def run(lp, lo, adv, rw):
        x = lp.clone().requires_grad_(True)
        out = ess_policy_loss(
            x, lo, adv, mask, loss_agg_mode=mode, ess_scope=scope, rollout_weights=rw
        )
        return out, _grad(out.loss, x)

    clean, g_clean = run(lp, lo, adv, rw)
    dirty = [t.clone() for t in (lp, lo, rw)]
    for t, junk in zip(dirty, (junk_a, junk_b, junk_a), strict=True):
        t[~mask] = junk
    adv_d = adv.clone()
    rows_empty = ~mask.any(-1)
    if adv_shape == "BT":
        adv_d[~mask] = junk_b
    else:
        adv_d[rows_empty] = junk_b
    out, g = run(dirty[0], dirty[1], adv_d, dirty[2])
    for name in clean._fields:
        assert torch.equal(getattr(out, name), getattr(clean, name)), name
    assert torch.equal(g, g_clean)
    assert torch.isfinite(out.loss) and (g[~mask] == 0).all()


@pytest.mark.slow
def test_fullgraph_compile_with_changing_python_normalizer() -> None:
    """verl passes a different Python int normaliser on every micro-batch: one compiled function
    must take three normalisers and two shapes without a graph break (``fullgraph=True``) and
    agree with eager. Fails with a ``float()``/``math.isfinite`` check of the normaliser."""
    torch._dynamo.reset()

    def f(lp, lo, adv, mask, n):
        return ess_policy_loss(lp, lo, adv, mask, normalizer=n).loss

    compiled = torch.compile(f, fullgraph=True, dynamic=None)
    for shape, normalizers in (((4, 16), (40, 57, 63)), ((6, 24), (40, 101, 7))):
        b = make_batch(*shape, seed=shape[0], dtype=torch.float32)
        for n in normalizers:
            lp = b.logp_new.detach().requires_grad_(True)
            got = compiled(lp, b.logp_old, b.advantages, b.mask, n)
            got.backward()
            lp_e = b.logp_new.detach().requires_grad_(True)
            want = f(lp_e, b.logp_old, b.advantages, b.mask, n)
            want.backward()
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(lp.grad, lp_e.grad)
    # A bad normaliser still stops the call: fullgraph turns our ValueError into dynamo's
    # error, which carries the message; without fullgraph it is the ValueError itself.
    with pytest.raises(Exception, match="normalizer must be a finite positive number"):
        compiled(lp, b.logp_old, b.advantages, b.mask, 0)
    with pytest.raises(ValueError, match="normalizer must be a finite positive number"):
        torch.compile(f)(lp, b.logp_old, b.advantages, b.mask, -3)
