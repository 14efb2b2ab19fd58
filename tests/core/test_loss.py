"""ess_policy_loss against the naive reference: values, gradients, limits and numerics."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from ess_po import ess_policy_loss, ess_stats
from ess_po.testing.batches import make_batch
from ess_po.testing.reference import naive_ess_loss, reinforce_loss

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum"]
SCOPES = ["call", "sequence"]


def _grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, x)
    return g


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("adv_shape", ["B", "B1", "BT"])
def test_matches_reference_float64(mode: str, scope: str, adv_shape: str) -> None:
    b = make_batch(5, 9, seed=hash((mode, scope, adv_shape)) % 1000, adv_shape=adv_shape)
    out = ess_policy_loss(
        b.logp_new, b.logp_old, b.advantages, b.mask, loss_agg_mode=mode, ess_scope=scope
    )
    ref = naive_ess_loss(
        b.logp_new, b.logp_old, b.advantages, b.mask, loss_agg_mode=mode, ess_scope=scope
    )
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        _grad(out.loss, b.logp_new), _grad(ref, b.logp_new), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(
        out.policy_loss + out.regularizer_loss, out.loss.float(), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("mode", MODES)
def test_rollout_weights_multiply_policy_term(mode: str) -> None:
    b = make_batch(4, 6, seed=3)
    c = torch.rand(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2
    out = ess_policy_loss(
        b.logp_new, b.logp_old, b.advantages, b.mask, loss_agg_mode=mode, rollout_weights=c
    )
    ref = naive_ess_loss(
        b.logp_new, b.logp_old, b.advantages, b.mask, loss_agg_mode=mode, rollout_weights=c
    )
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(_grad(out.loss, b.logp_new), _grad(ref, b.logp_new))
    plain = ess_policy_loss(b.logp_new, b.logp_old, b.advantages, b.mask, loss_agg_mode=mode)
    assert not torch.allclose(out.policy_loss, plain.policy_loss)
    torch.testing.assert_close(out.regularizer_loss, plain.regularizer_loss)


# Tolerances per input dtype: compute is float32 inside, so the loss is at least as precise as
# the inputs; the reference sees the same (rounded) inputs in float64.
DTYPE_TOL = {
    torch.float32: dict(rtol=2e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-5, atol=1e-6),
}
GRAD_TOL = {
    torch.float32: dict(rtol=2e-5, atol=1e-7),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-4),  # the gradient is returned in bfloat16
    torch.float16: dict(rtol=2e-3, atol=1e-5),
}


@pytest.mark.parametrize("dtype", list(DTYPE_TOL))
@pytest.mark.parametrize("scope", SCOPES)
def test_low_precision_inputs(dtype: torch.dtype, scope: str) -> None:
    b = make_batch(6, 33, seed=11, dtype=dtype)
    out = ess_policy_loss(b.logp_new, b.logp_old, b.advantages, b.mask, ess_scope=scope)
    assert out.loss.dtype == torch.float32
    lp64 = b.logp_new.detach().double().requires_grad_(True)
    ref = naive_ess_loss(lp64, b.logp_old.double(), b.advantages.double(), b.mask, ess_scope=scope)
    torch.testing.assert_close(out.loss.double(), ref, **DTYPE_TOL[dtype])
    g = _grad(out.loss, b.logp_new)
    assert g.dtype == dtype
    torch.testing.assert_close(g.double(), _grad(ref, lp64), **GRAD_TOL[dtype])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scope", SCOPES)
def test_gradcheck_float64(mode: str, scope: str) -> None:
    """Finite differences see the stop-gradient parts (ESS, the cap) move, so gradcheck applies
    where their derivatives vanish: every ratio equal and above 1. There ESS = 1 is at its
    maximum (zero derivative), every weight is capped at ESS, and autograd's gradient must equal the numerical derivative of the loss. Away from that point the gradient is
    checked against the naive autograd reference (test_matches_reference_float64), and the
    second derivative in test_core_numerics.test_hessian_matches_float64_reference."""
    b = make_batch(3, 5, seed=7, adv_shape="BT")
    lo = b.logp_new.detach() - 0.3  # all ratios e^0.3 > ESS = 1

    def f(lp: torch.Tensor) -> torch.Tensor:
        return ess_policy_loss(
            lp, lo, b.advantages, b.mask, loss_agg_mode=mode, ess_scope=scope
        ).loss

    lp = b.logp_new.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (lp,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("adv_shape", ["B", "BT"])
def test_on_policy_is_reinforce(adv_shape: str) -> None:
    b = make_batch(6, 10, seed=5, adv_shape=adv_shape)
    out = ess_policy_loss(b.logp_new, b.logp_new.detach(), b.advantages, b.mask)
    assert out.ess.item() == 1.0
    assert out.capped_frac.item() == 0.0
    assert out.regularizer_loss.item() == 0.0
    assert out.kl_behavior.item() == 0.0
    ref = reinforce_loss(b.logp_new, b.advantages, b.mask)
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(_grad(out.loss, b.logp_new), _grad(ref, b.logp_new))


def test_regularizer_zero_at_behaviour_and_positive_elsewhere() -> None:
    b = make_batch(4, 8, seed=2, staleness=0.8)
    zero_adv = torch.zeros(4, dtype=torch.float64)
    out = ess_policy_loss(b.logp_new, b.logp_old, zero_adv, b.mask)
    assert out.ess.item() < 1.0
    assert out.policy_loss.item() == 0.0
    assert out.loss.item() > 0.0
    g = _grad(out.loss, b.logp_new)
    d = (b.logp_new - b.logp_old).detach()
    # Gradient descent moves logp_new toward logp_old: grad has the sign of d at valid tokens.
    valid = b.mask & (d != 0)
    assert torch.equal(torch.sign(g[valid]), torch.sign(d[valid]))
    assert torch.all(g[~b.mask] == 0)


@pytest.mark.parametrize("magnitude", [20.0, 80.0, 200.0, 1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_extreme_log_ratios_stay_finite_and_pull_back(magnitude: float, dtype) -> None:
    # One sequence far above, one far below, two on-policy tokens per row.
    lp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]], dtype=dtype, requires_grad=True)
    lo = torch.full((2, 3), -1.0, dtype=torch.float64)
    lo[0, 0] = -1.0 - magnitude  # d = +magnitude: new policy far above the behaviour policy
    lo[1, 0] = -1.0 + magnitude  # d = -magnitude: new policy far below the behaviour policy
    lo = lo.to(dtype)
    adv = torch.zeros(2, dtype=dtype)
    mask = torch.ones(2, 3, dtype=torch.bool)
    out = ess_policy_loss(lp, lo, adv, mask)
    for name, value in out._asdict().items():
        assert torch.isfinite(value).all(), (name, value)
    # With one ratio of e^{+m} among 6 tokens ESS tends to 1/6, never to 1.
    assert 1 / 6 - 1e-3 <= out.ess.item() < 0.5
    g = _grad(out.loss, lp)
    # fp16 cannot hold the tail's gradient (about e^m / 6): it overflows to -inf, as autograd's
    # own cast does, so a GradScaler sees it; the other dtypes hold it.
    assert torch.isfinite(g).all() or (dtype == torch.float16 and not torch.isnan(g).any())
    assert g[0, 0] > 0  # d > 0: descent lowers logp_new
    assert g[1, 0] < 0  # d < 0: descent raises logp_new, also past the linear tail
    assert (g[:, 1:] == 0).all()


def test_linear_tail_is_continuous_and_monotone() -> None:
    """Across d = -LINEAR_TAIL the regulariser's gradient is continuous, negative, and its
    magnitude grows as d falls (then stays constant): no flip, no zero."""
    d = torch.linspace(-60, -40, 2001, dtype=torch.float64)
    n = len(d)
    # Row r: token 0 has log ratio d[r], token 1 is on-policy; sequence scope gives each row
    # an ESS < 1, so each token's regulariser has a positive weight.
    lp = torch.zeros(n, 2, dtype=torch.float64)
    lp[:, 0] = d
    lp.requires_grad_(True)
    out = ess_policy_loss(
        lp,
        torch.zeros(n, 2, dtype=torch.float64),
        torch.zeros(n, dtype=torch.float64),
        torch.ones(n, 2, dtype=torch.bool),
        ess_scope="sequence",
        loss_agg_mode="token-sum",
    )
    g = _grad(out.loss, lp)[:, 0]
    assert torch.isfinite(g).all() and (g < 0).all()
    mags = g.abs()
    assert torch.all(mags[:-1] >= mags[1:] * (1 - 1e-9))  # |grad| non-increasing in d
    steps = (mags[1:] - mags[:-1]).abs() / mags[:-1]
    assert steps.max() < 0.02  # continuous at the tail boundary (grid step 0.01)


def test_masked_garbage_never_leaks() -> None:
    b = make_batch(5, 8, seed=9, adv_shape="BT", empty_rows=1)
    clean = ess_policy_loss(b.logp_new, b.logp_old, b.advantages, b.mask)
    g_clean = _grad(clean.loss, b.logp_new)
    lp = b.logp_new.detach().clone()
    lp[~b.mask] = float("-inf")
    lp.requires_grad_(True)
    lo = b.logp_old.clone()
    lo[~b.mask] = float("nan")
    adv = b.advantages.clone()
    adv[~b.mask] = float("nan")
    w = torch.ones(5, 8, dtype=torch.float64)
    w[~b.mask] = float("inf")
    dirty = ess_policy_loss(lp, lo, adv, b.mask, rollout_weights=w)
    for name in clean._fields:
        torch.testing.assert_close(getattr(dirty, name), getattr(clean, name), msg=name)
    g = _grad(dirty.loss, lp)
    torch.testing.assert_close(g, g_clean)
    assert torch.all(g[~b.mask] == 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scope", SCOPES)
def test_no_valid_tokens(mode: str, scope: str) -> None:
    lp = torch.full((3, 4), float("-inf"), requires_grad=True)
    out = ess_policy_loss(
        lp,
        torch.zeros(3, 4),
        torch.ones(3),
        torch.zeros(3, 4),
        loss_agg_mode=mode,
        ess_scope=scope,
    )
    assert out.loss.item() == 0.0
    assert out.ess.item() == 1.0 and out.ess_min.item() == 1.0
    for name, value in out._asdict().items():
        assert torch.isfinite(value).all(), name
    g = _grad(out.loss, lp)
    assert torch.equal(g, torch.zeros_like(g))


def test_float_mask_equals_bool_mask(batch) -> None:
    a = ess_policy_loss(batch.logp_new, batch.logp_old, batch.advantages, batch.mask)
    f = ess_policy_loss(
        batch.logp_new, batch.logp_old, batch.advantages, batch.mask.to(torch.float32)
    )
    for name in a._fields:
        torch.testing.assert_close(getattr(a, name), getattr(f, name))


def test_diagnostics_match_naive(batch) -> None:
    out = ess_policy_loss(batch.logp_new, batch.logp_old, batch.advantages, batch.mask)
    m = batch.mask
    d = (batch.logp_new - batch.logp_old).detach()[m]
    w = d.exp()
    ess = w.sum() ** 2 / (len(w) * (w**2).sum())
    torch.testing.assert_close(out.ess, ess.float())
    torch.testing.assert_close(out.capped_frac, (w > ess).double().mean().float())
    torch.testing.assert_close(out.kl_behavior, (d + torch.exp(-d) - 1).mean().float())
    torch.testing.assert_close(out.ratio_mean, w.mean().float())
    torch.testing.assert_close(out.ratio_max, w.max().float())
    assert out.num_tokens.item() == m.sum().item()
    assert set(out.metrics()) == set(out._fields) - {"loss", "num_tokens"}
    for v in out.metrics().values():
        assert not v.requires_grad and v.dim() == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scope", SCOPES)
def test_split_with_global_normalizer_equals_whole(mode: str, scope: str) -> None:
    """Gradient accumulation: micro-batch losses with the global normaliser add up to the
    whole-batch loss, exactly when the ESS of each piece is the ESS of the whole (sequence
    scope, or an on-policy batch in batch scope)."""
    b = make_batch(8, 6, seed=4, empty_rows=1)
    old = b.logp_old if scope == "sequence" else b.logp_new.detach()
    if mode == "token-mean":
        norm = float(b.mask.sum())
    elif mode == "token-sum":
        norm = None
    else:
        norm = float((b.mask.sum(-1) > 0).sum())
    whole = ess_policy_loss(
        b.logp_new, old, b.advantages, b.mask, loss_agg_mode=mode, ess_scope=scope
    )
    g_whole = _grad(whole.loss, b.logp_new)
    total = 0.0
    for rows in (slice(0, 3), slice(3, 4), slice(4, 8)):
        part = ess_policy_loss(
            b.logp_new[rows],
            old[rows],
            b.advantages[rows],
            b.mask[rows],
            loss_agg_mode=mode,
            ess_scope=scope,
            normalizer=norm,
        )
        total = total + part.loss
    torch.testing.assert_close(total, whole.loss)
    torch.testing.assert_close(_grad(total, b.logp_new), g_whole)


def test_normalizer_tensor_and_number_agree(batch) -> None:
    a = ess_policy_loss(batch.logp_new, batch.logp_old, batch.advantages, batch.mask, normalizer=17)
    t = ess_policy_loss(
        batch.logp_new, batch.logp_old, batch.advantages, batch.mask, normalizer=torch.tensor(17)
    )
    torch.testing.assert_close(a.loss, t.loss)
    base = ess_policy_loss(batch.logp_new, batch.logp_old, batch.advantages, batch.mask)
    torch.testing.assert_close(a.loss * 17, base.loss * batch.mask.sum())


def test_cap_is_one_sided() -> None:
    """A high-ratio token keeps score-function weight ESS > 0 (a clip would zero its gradient);
    a low-ratio token keeps its own ratio w."""
    lp = torch.tensor([[0.0, 0.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    lo = torch.tensor([[-3.0, 0.0, 1.0, 2.0]], dtype=torch.float64)  # w = e^3, 1, e^-1, e^-2
    adv = torch.tensor([1.0], dtype=torch.float64)
    out = ess_policy_loss(lp, lo, adv, torch.ones(1, 4))
    w = torch.exp(-lo[0])
    ess = (w.sum() ** 2 / (4 * (w**2).sum())).item()
    assert out.ess.item() == pytest.approx(ess, rel=1e-6)
    assert out.capped_frac.item() == pytest.approx(0.75)  # e^3, 1 and e^-1 exceed ESS ~ 0.288
    g = _grad(out.loss, lp)[0]
    k3_grad = (1 - ess) * (1 - torch.exp(lo[0]))  # d(k3)/dd = 1 - e^-d, d = -lo
    torch.testing.assert_close(g[0], (-ess + k3_grad[0]) / 4)
    torch.testing.assert_close(g[3], (-math.exp(-2) + k3_grad[3]) / 4)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("scope", [*SCOPES, "step"])
def test_compiled_fullgraph_matches_eager(scope: str) -> None:
    """One implementation: under torch.compile(fullgraph=True) the values, diagnostics,
    gradients and NaN semantics are those of eager mode (masked garbage is dropped, a NaN at a
    valid position reaches the loss). "step": batch scope with precomputed ``stats``."""
    b = make_batch(4, 16, seed=12, dtype=torch.float32, empty_rows=1)
    kwargs = {"ess_scope": scope} if scope != "step" else {}
    if scope == "step":
        kwargs["stats"] = ess_stats(b.logp_new.detach() - b.logp_old + 0.1, b.mask)
    compiled = torch.compile(ess_policy_loss, fullgraph=True, dynamic=False)
    fn = functools.partial(compiled, **kwargs)
    lp_dirty = b.logp_new.detach().clone()
    lp_dirty[~b.mask] = float("nan")
    adv = b.advantages.clone()
    adv[0] = float("nan")  # the empty row's advantage
    lp_nan = b.logp_new.detach().clone()
    lp_nan[1, 0] = float("nan")  # valid position
    for lp, a in ((b.logp_new.detach(), b.advantages), (lp_dirty, adv), (lp_nan, b.advantages)):
        lp_e = lp.clone().requires_grad_(True)
        lp_c = lp.clone().requires_grad_(True)
        eager = ess_policy_loss(lp_e, b.logp_old, a, b.mask, **kwargs)
        comp = fn(lp_c, b.logp_old, a, b.mask)
        for name in eager._fields:
            torch.testing.assert_close(
                getattr(comp, name), getattr(eager, name), msg=name, equal_nan=True
            )
        eager.loss.backward()
        comp.loss.backward()
        torch.testing.assert_close(lp_c.grad, lp_e.grad, equal_nan=True)
        assert torch.isnan(eager.loss) == (lp is lp_nan)
        assert (lp_e.grad[~b.mask] == 0).all()


@pytest.mark.parametrize("scope", SCOPES)
def test_non_contiguous_inputs_match_contiguous(scope: str) -> None:
    """Transposed (non-contiguous) inputs give the same loss, diagnostics and gradient."""
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(64, 48, generator=g) * 3
    new = (old + 0.5 * torch.randn(64, 48, generator=g)).requires_grad_(True)
    adv = torch.randn(48, generator=g)
    mask = torch.rand(48, 64, generator=g) > 0.3
    nt, ot = new.T, old.T
    assert not nt.is_contiguous()
    out_t = ess_policy_loss(nt, ot, adv, mask, ess_scope=scope)
    ref = naive_ess_loss(nt, ot, adv, mask, ess_scope=scope)
    new_c = nt.detach().contiguous().requires_grad_(True)
    out_c = ess_policy_loss(new_c, ot.contiguous(), adv, mask, ess_scope=scope)
    for name in out_c._fields:
        torch.testing.assert_close(getattr(out_t, name), getattr(out_c, name), msg=name)
    torch.testing.assert_close(out_t.loss.double(), ref, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(_grad(out_t.loss, new).T, _grad(out_c.loss, new_c))
