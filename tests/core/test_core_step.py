"""Step scope (issue 15, core part): one ESS per optimizer step, given to every loss call as
precomputed statistics, whatever the split into micro-batches."""

from __future__ import annotations

import pytest
import torch

from ess_po import ESSStats, ess_policy_loss, ess_stats, ess_token_loss, step_stats
from ess_po.testing.reference import naive_ess, naive_ess_loss

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum"]


def _step():
    """64 sequences with a few outlier tokens, as in issue 15's table (smaller)."""
    g = torch.Generator().manual_seed(5)
    B, T = 16, 24
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    noise = 0.02 * torch.randn(B, T, generator=g, dtype=torch.float64)
    noise[3, 5] += 1.5
    noise[11, 2] -= 2.0
    new = (old + noise).requires_grad_(True)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[7] = 0
    mask = torch.arange(T) < lengths.unsqueeze(1)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return new, old, adv, mask


def _normalizer(mode: str, mask: torch.Tensor):
    if mode == "token-mean":
        return int(mask.sum())
    if mode == "token-sum":
        return None
    return int((mask.sum(-1) > 0).sum())


def _split_run(n_micro: int, mode: str, use_stats: bool):
    new, old, adv, mask = _step()
    chunks = list(zip(*(t.chunk(n_micro) for t in (new, old, adv, mask)), strict=True))
    stats = step_stats([(lp.detach() - lo, m) for lp, lo, _, m in chunks]) if use_stats else None
    total, esses = 0.0, []
    for lp, lo, a, m in chunks:
        out = ess_policy_loss(
            lp, lo, a, m, loss_agg_mode=mode, normalizer=_normalizer(mode, mask), stats=stats
        )
        total = total + out.loss
        esses.append(out.ess)
    total.backward()
    return total.detach(), new.grad, torch.stack(esses)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n_micro", [1, 2, 4, 8])
def test_step_stats_make_the_split_irrelevant(mode: str, n_micro: int) -> None:
    new, old, adv, mask = _step()
    whole = ess_policy_loss(new, old, adv, mask, loss_agg_mode=mode)
    whole.loss.backward()
    ref = naive_ess_loss(new, old, adv, mask, loss_agg_mode=mode)
    torch.testing.assert_close(whole.loss, ref)
    loss, grad, esses = _split_run(n_micro, mode, use_stats=True)
    torch.testing.assert_close(loss, whole.loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, new.grad, rtol=1e-12, atol=1e-14)
    ess64 = naive_ess((new - old).detach(), mask)
    torch.testing.assert_close(esses, ess64.float().expand(n_micro))


@pytest.mark.parametrize("n_micro", [2, 4, 8])
def test_per_call_scope_depends_on_the_split(n_micro: int) -> None:
    """Without step statistics each call has its own ESS: the gradient changes with the split
    (this is what the step scope exists for; it also shows the test above can fail)."""
    new, old, adv, mask = _step()
    ess_policy_loss(new, old, adv, mask).loss.backward()
    _, grad, esses = _split_run(n_micro, "token-mean", use_stats=False)
    assert esses.max() - esses.min() > 1e-3
    assert (grad - new.grad).abs().max() > 1e-4 * new.grad.abs().max()


def test_token_loss_with_stats_and_verl_style_aggregation() -> None:
    new, old, adv, mask = _step()
    stats = ess_stats(new.detach() - old, mask)
    tok = ess_token_loss(new, old, adv, mask, stats=stats)
    assert tok.loss.shape == mask.shape
    assert torch.equal(tok.loss[~mask], torch.zeros_like(tok.loss[~mask]))
    agg = (tok.loss * mask).sum() / mask.sum()
    torch.testing.assert_close(agg, ess_policy_loss(new, old, adv, mask).loss)
    assert set(tok.metrics()) >= {"ess", "capped_frac", "capped_mass", "ratio_min"}


def test_stats_validation() -> None:
    new, old, adv, mask = _step()
    stats = ess_stats(new.detach() - old, mask)
    with pytest.raises(ValueError, match=r"stats must be an ESSStats.*got tuple"):
        ess_policy_loss(new, old, adv, mask, stats=tuple(stats))
    with pytest.raises(ValueError, match=r"stats.*0-dim.*ess_stats\(log_ratio, mask\)"):
        ess_policy_loss(new, old, adv, mask, stats=ess_stats(new.detach() - old, mask, dim=-1))
    with pytest.raises(ValueError, match=r"stats is on meta but logp_new is on cpu"):
        meta = ESSStats(*(torch.empty((), device="meta") for _ in range(4)))
        ess_policy_loss(new, old, adv, mask, stats=meta)
    with pytest.raises(ValueError, match=r"stats cannot be used with ess_scope='sequence'"):
        ess_policy_loss(new, old, adv, mask, stats=stats, ess_scope="sequence")
    empty = ess_stats(torch.zeros(2), torch.zeros(2, dtype=torch.bool))
    ess_policy_loss(new, old, adv, mask, stats=empty)  # metadata is fine; values unchecked
    with pytest.raises(ValueError, match=r"stats.*no valid tokens \(count 0\)"):
        ess_policy_loss(new, old, adv, mask, stats=empty, check_values=True)
    nan = ESSStats(*(torch.tensor(float("nan"), dtype=torch.float64) for _ in range(4)))
    with pytest.raises(ValueError, match=r"stats.*not finite"):
        ess_policy_loss(new, old, adv, mask, stats=nan, check_values=True)


def test_step_stats_needs_a_part_and_merges_empty_ones() -> None:
    with pytest.raises(ValueError, match=r"step_stats got no \(log_ratio, mask\) pairs"):
        step_stats([])
    lw = torch.tensor([[0.0, 1.0, -2.0]])
    empty = (torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.bool))
    for a, b in zip(step_stats([empty, (lw, None), empty]), ess_stats(lw), strict=True):
        torch.testing.assert_close(a, b)
