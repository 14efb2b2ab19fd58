"""Bad input raises ValueError naming the argument and what was seen."""

from __future__ import annotations

import pytest
import torch

from ess_po import effective_sample_size, ess_policy_loss


def _good(B: int = 2, T: int = 3):
    return torch.zeros(B, T, requires_grad=True), torch.zeros(B, T), torch.ones(B), torch.ones(B, T)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(logp_new=torch.zeros(6)), r"logp_new must be 2-D \(B, T\).*shape \(6,\)"),
        (
            dict(logp_old=torch.zeros(2, 4)),
            r"logp_old must have the shape of logp_new \(2, 3\), got \(2, 4\)",
        ),
        (dict(mask=torch.ones(3, 3)), r"mask must have the shape.*got \(3, 3\)"),
        (
            dict(advantages=torch.ones(3)),
            r"advantages must have shape \(B,\), \(B, 1\) or \(B, T\).*got \(3,\)",
        ),
        (dict(advantages=torch.ones(2, 2)), r"advantages.*got \(2, 2\)"),
        (
            dict(advantages=torch.ones(2, dtype=torch.int64)),
            r"advantages must be a floating-point tensor",
        ),
        (
            dict(logp_old=torch.zeros(2, 3, device="meta")),
            r"logp_old is on meta but logp_new is on cpu",
        ),
    ],
)
def test_metadata_errors(change: dict, match: str) -> None:
    args = dict(zip(["logp_new", "logp_old", "advantages", "mask"], _good(), strict=True))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        ess_policy_loss(**args)


@pytest.mark.parametrize("name", ["logp_new", "logp_old", "advantages", "mask"])
def test_non_tensor_inputs_raise_type_error(name: str) -> None:
    args = dict(zip(["logp_new", "logp_old", "advantages", "mask"], _good(), strict=True))
    args[name] = args[name].tolist()
    with pytest.raises(TypeError, match=rf"{name} must be a torch.Tensor, got list"):
        ess_policy_loss(**args)


def test_mixed_dtypes_accepted() -> None:
    lp, lo, adv, mask = _good()
    out = ess_policy_loss(lp, lo.double(), adv.half(), mask.int())
    assert out.loss.dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(loss_agg_mode="seq-mean"),
            r"loss_agg_mode='seq-mean' is not supported; choose one of",
        ),
        (dict(ess_scope="token"), r"ess_scope='token' is not supported"),
        (dict(normalizer=0), r"normalizer must be a finite positive number.*got 0"),
        (dict(normalizer=-3.0), r"normalizer must be a finite positive number"),
        (
            dict(normalizer=torch.ones(2)),
            r"normalizer must be a number or a one-element tensor, got shape \(2,\)",
        ),
        (
            dict(normalizer=5, loss_agg_mode="token-sum"),
            r"normalizer is not used with loss_agg_mode='token-sum'",
        ),
        (
            dict(rollout_weights=torch.ones(2, 2)),
            r"rollout_weights must have the shape of logp_new",
        ),
    ],
)
def test_option_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ess_policy_loss(*_good(), **kwargs)


def test_options_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        ess_policy_loss(*_good(), "token-mean")  # type: ignore[misc]
    with pytest.raises(TypeError):
        ess_policy_loss(*_good(), loss_agg_modes="token-mean")  # type: ignore[call-arg]


def test_value_checks_are_opt_in_and_locate_bad_values() -> None:
    lp, lo, adv, mask = _good()
    lo = lo.clone()
    lo[1, 2] = float("nan")
    ess_policy_loss(lp, lo, adv, mask.bool() & False)  # masked NaN: fine without checks
    ess_policy_loss(lp, lo, adv, mask)  # unchecked by default: no host synchronisation
    with pytest.raises(
        ValueError, match=r"logp_old has 1 non-finite values at valid .* \[\[1, 2\]\]"
    ):
        ess_policy_loss(lp, lo, adv, mask, check_values=True)
    bad_mask = torch.tensor([[1.0, 0.5, 0.0], [1.0, 1.0, 2.0]])
    with pytest.raises(
        ValueError,
        match=r"mask must contain only 0 and 1; found 2 other .*\[\[0, 1\], \[1, 2\]\].*\[0.5, 2.0\]",
    ):
        ess_policy_loss(lp, torch.zeros(2, 3), adv, bad_mask, check_values=True)
    adv_bad = torch.tensor([1.0, float("inf")])
    with pytest.raises(ValueError, match=r"advantages has 1 non-finite"):
        ess_policy_loss(lp, torch.zeros(2, 3), adv_bad, mask, check_values=True)
    with pytest.raises(ValueError, match=r"normalizer must be finite and positive"):
        ess_policy_loss(
            lp, torch.zeros(2, 3), adv, mask, normalizer=torch.tensor(0.0), check_values=True
        )
    ess_policy_loss(lp, torch.zeros(2, 3), adv, mask, check_values=True)  # clean input passes


def test_ess_errors() -> None:
    with pytest.raises(ValueError, match=r"mask must have the shape of log_ratio \(2, 3\)"):
        effective_sample_size(torch.zeros(2, 3), torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"log_ratio must be floating point"):
        effective_sample_size(torch.zeros(2, 3, dtype=torch.int64))
