"""One name for the tokens one ESS is computed over: ``ess_scope`` in {"call", "step",
"sequence"}; the old "batch" still works and warns."""

from __future__ import annotations

import pytest
import torch

from ess_po import ESSLossOutput, ESSTokenLoss, ess_policy_loss, ess_stats, ess_token_loss
from ess_po.types import ESS_SCOPES


def _batch():
    g = torch.Generator().manual_seed(3)
    old = -torch.rand(4, 6, generator=g)
    new = (old + 0.3 * torch.randn(4, 6, generator=g)).requires_grad_(True)
    mask = torch.rand(4, 6, generator=g) > 0.2
    return new, old, torch.randn(4, generator=g), mask


def test_scope_values_are_the_vocabulary() -> None:
    assert ESS_SCOPES == ("call", "step", "sequence")
    assert ESSTokenLoss is ESSLossOutput


def test_default_is_call_without_stats_and_step_with_them() -> None:
    new, old, adv, mask = _batch()
    call = ess_policy_loss(new, old, adv, mask, ess_scope="call")
    default = ess_policy_loss(new, old, adv, mask)
    torch.testing.assert_close(default.loss, call.loss, rtol=0, atol=0)
    stats = ess_stats((new.detach() - old)[:2], mask[:2])  # another token set: another ESS
    step = ess_policy_loss(new, old, adv, mask, stats=stats, ess_scope="step")
    implicit = ess_policy_loss(new, old, adv, mask, stats=stats)
    torch.testing.assert_close(implicit.loss, step.loss, rtol=0, atol=0)
    torch.testing.assert_close(step.ess, stats.ess())
    assert not torch.allclose(step.ess, call.ess)


@pytest.mark.parametrize("with_stats", [False, True])
def test_old_batch_name_warns_and_keeps_its_meaning(with_stats: bool) -> None:
    new, old, adv, mask = _batch()
    stats = ess_stats(new.detach() - old, mask) if with_stats else None
    new_name = "step" if with_stats else "call"
    with pytest.warns(FutureWarning, match=f"ess_scope='batch' is deprecated.*'{new_name}'"):
        legacy = ess_policy_loss(new, old, adv, mask, ess_scope="batch", stats=stats)
    now = ess_policy_loss(new, old, adv, mask, ess_scope=new_name, stats=stats)
    torch.testing.assert_close(legacy.loss, now.loss, rtol=0, atol=0)
    with pytest.warns(FutureWarning):
        ess_token_loss(new, old, adv, mask, ess_scope="batch", stats=stats)


def test_step_without_stats_and_call_with_stats_name_the_fix() -> None:
    new, old, adv, mask = _batch()
    with pytest.raises(ValueError, match=r"ess_scope='step' needs .*stats=step_stats"):
        ess_policy_loss(new, old, adv, mask, ess_scope="step")
    stats = ess_stats(new.detach() - old, mask)
    with pytest.raises(ValueError, match=r"pass ess_scope='step'"):
        ess_policy_loss(new, old, adv, mask, ess_scope="call", stats=stats)
    with pytest.raises(ValueError, match=r"ess_scope='token' is not supported"):
        ess_policy_loss(new, old, adv, mask, ess_scope="token")


def test_scalar_result_metrics_keep_the_loss_parts() -> None:
    new, old, adv, mask = _batch()
    out = ess_policy_loss(new, old, adv, mask)
    assert {"policy_loss", "regularizer_loss", "ess", "capped_mass"} <= set(out.metrics())
    tok = ess_token_loss(new, old, adv, mask)
    assert "policy_loss" not in tok.metrics() and "ess" in tok.metrics()
    assert all(v.dim() == 0 for v in tok.metrics().values())
