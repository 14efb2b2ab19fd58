"""Argument checks for the public functions.

Shape, dtype and device checks read only tensor metadata, so they are free and always on.
Value checks (NaN/inf, non-binary masks) need the device to report back; they run only when
the caller opts in with ``check_values=True``.
"""

from __future__ import annotations

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum")
ESS_SCOPES = ("batch", "sequence")


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(choices)}.")


def check_loss_inputs(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    rollout_weights: torch.Tensor | None,
) -> None:
    """Metadata checks for :func:`ess_po.ess_policy_loss` (no host synchronisation)."""
    named = {"logp_new": logp_new, "logp_old": logp_old, "advantages": advantages, "mask": mask}
    if rollout_weights is not None:
        named["rollout_weights"] = rollout_weights
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if logp_new.dim() != 2:
        raise ValueError(
            f"logp_new must be 2-D (B, T) per-token log-probabilities, got {_describe(logp_new)}."
        )
    shape = logp_new.shape
    for name in ("logp_old", "mask", "rollout_weights"):
        t = named.get(name)
        if t is not None and t.shape != shape:
            raise ValueError(
                f"{name} must have the shape of logp_new {tuple(shape)}, got {tuple(t.shape)}."
            )
    batch = shape[0]
    adv_shapes = ((batch,), (batch, 1), tuple(shape))
    if tuple(advantages.shape) not in adv_shapes:
        raise ValueError(
            f"advantages must have shape (B,), (B, 1) or (B, T) = {[list(s) for s in adv_shapes]}, "
            f"got {tuple(advantages.shape)}."
        )
    device = logp_new.device
    for name, t in named.items():
        if t.device != device:
            raise ValueError(
                f"{name} is on {t.device} but logp_new is on {device}; move all inputs to one "
                f"device, e.g. {name}.to(logp_new.device)."
            )
        if name != "mask" and not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {_describe(t)}.")
    if logp_old.dtype != logp_new.dtype:
        raise ValueError(
            f"logp_old has dtype {logp_old.dtype} but logp_new has {logp_new.dtype}; cast one, "
            f"e.g. logp_old.to(logp_new.dtype)."
        )
    if mask.is_complex():
        raise ValueError(f"mask must be bool or real-valued 0/1, got {_describe(mask)}.")


def check_loss_values(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    rollout_weights: torch.Tensor | None,
) -> None:
    """Opt-in value checks; they synchronise with the device."""
    if mask.dtype != torch.bool:
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            idx = bad.nonzero()[:5].tolist()
            vals = mask[bad][:5].tolist()
            raise ValueError(
                f"mask must contain only 0 and 1; found {int(bad.sum())} other values, first at "
                f"(row, col) {idx} with values {vals}. Pass mask.bool() or a 0/1 tensor."
            )
    valid = mask.bool()
    named = {"logp_new": logp_new, "logp_old": logp_old, "rollout_weights": rollout_weights}
    named["advantages"] = advantages
    for name, t in named.items():
        if t is None:
            continue
        positions = valid if t.shape == valid.shape else valid.any(-1).reshape(t.shape)
        bad = ~torch.isfinite(t) & positions
        if bool(bad.any()):
            idx = bad.nonzero()[:5].tolist()
            raise ValueError(
                f"{name} has {int(bad.sum())} non-finite values at valid (mask=1) positions, "
                f"first at {idx}. Masked positions may hold anything; valid ones must be finite."
            )
