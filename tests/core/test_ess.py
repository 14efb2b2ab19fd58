"""Properties of the normalized effective sample size (hypothesis)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ess_po import ESSStats, effective_sample_size, ess_stats
from ess_po.testing.reference import naive_ess

log_ratios = st.lists(
    st.floats(min_value=-30, max_value=30, allow_nan=False, width=64), min_size=1, max_size=40
)
PROPS = settings(deadline=None, max_examples=60)


def _t(xs: list[float]) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


@PROPS
@given(log_ratios)
def test_range_and_reference(xs: list[float]) -> None:
    lw = _t(xs)
    ess = effective_sample_size(lw)
    n = len(xs)
    assert 1 / n - 1e-12 <= ess.item() <= 1.0
    torch.testing.assert_close(ess, naive_ess(lw, torch.ones(n)), rtol=1e-9, atol=1e-12)


@PROPS
@given(log_ratios)
def test_one_iff_uniform(xs: list[float]) -> None:
    lw = _t(xs)
    ess = effective_sample_size(lw).item()
    spread = max(xs) - min(xs)
    if spread == 0:
        assert ess == 1.0
    elif spread > 1e-3:
        assert ess < 1.0


@PROPS
@given(log_ratios, st.floats(min_value=-500, max_value=500, allow_nan=False))
def test_scale_invariance(xs: list[float], c: float) -> None:
    """Multiplying every ratio by e^c (adding c to log ratios) leaves ESS unchanged."""
    lw = _t(xs)
    torch.testing.assert_close(effective_sample_size(lw + c), effective_sample_size(lw))


@PROPS
@given(log_ratios, st.randoms(use_true_random=False))
def test_permutation_invariance(xs: list[float], rnd) -> None:
    ys = list(xs)
    rnd.shuffle(ys)
    torch.testing.assert_close(effective_sample_size(_t(ys)), effective_sample_size(_t(xs)))


@PROPS
@given(log_ratios, st.integers(0, 10), st.sampled_from([float("nan"), float("-inf"), 1e30, 0.0]))
def test_padding_invariance(xs: list[float], pad: int, junk: float) -> None:
    lw = torch.cat([_t(xs), torch.full((pad,), junk, dtype=torch.float64)])
    mask = torch.arange(len(lw)) < len(xs)
    torch.testing.assert_close(effective_sample_size(lw, mask), effective_sample_size(_t(xs)))


@PROPS
@given(st.integers(1, 64), st.floats(min_value=80, max_value=1e4))
def test_one_dominant_token_gives_one_over_n(n: int, gap: float) -> None:
    """Log ratios far apart (±80 and beyond) give a finite ESS near 1/n, never an overflow."""
    for dtype in (torch.float32, torch.float64):
        for sign in (1.0, -1.0):
            lw = torch.zeros(n, dtype=dtype)
            lw[0] = sign * gap
            ess = effective_sample_size(lw).item()
            assert math.isfinite(ess)
            if sign > 0:
                assert abs(ess - 1 / n) < 1e-6
            else:  # one token vanishes: the rest are uniform
                expected = 1.0 if n == 1 else (n - 1) / n
                assert abs(ess - expected) < 1e-5


@PROPS
@given(st.lists(log_ratios, min_size=1, max_size=5))
def test_stats_merge_equals_concatenation(parts: list[list[float]]) -> None:
    """Sufficient statistics of disjoint pieces merge exactly into those of the whole."""
    merged = ess_stats(_t(parts[0]))
    for p in parts[1:]:
        merged = merged.merge(ess_stats(_t(p)))
    whole = ess_stats(_t([x for p in parts for x in p]))
    for a, b in zip(merged, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(merged.ess(), whole.ess())


def test_empty_is_one_and_merges_as_zero_mass() -> None:
    empty = ess_stats(torch.zeros(3), torch.zeros(3, dtype=torch.bool))
    assert empty.ess().item() == 1.0
    assert empty.count.item() == 0
    full = ess_stats(torch.tensor([0.0, 1.0, 2.0]))
    for a, b in zip(empty.merge(full), full, strict=True):
        torch.testing.assert_close(a, b)


def test_per_sequence_dim() -> None:
    lw = torch.tensor([[0.0, 0.0, 80.0], [0.0, 1.0, -1.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    ess = effective_sample_size(lw, mask, dim=-1)
    assert ess.shape == (3,)
    torch.testing.assert_close(ess[0], torch.tensor(1 / 3))
    torch.testing.assert_close(ess[1].double(), naive_ess(lw[1], mask[1]), rtol=1e-6, atol=0)
    assert ess[2].item() == 1.0
    stats = ess_stats(lw, mask, dim=-1)
    assert isinstance(stats, ESSStats) and stats.count.tolist() == [3.0, 2.0, 0.0]


def test_detached_and_float32_out() -> None:
    lw = torch.randn(4, 5, dtype=torch.bfloat16, requires_grad=True)
    ess = effective_sample_size(lw)
    assert ess.dtype == torch.float32 and not ess.requires_grad
