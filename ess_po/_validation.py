"""Argument checks for the public functions.

Type, shape, dtype and device checks read only metadata, so they are free and always on. Value
checks (NaN/inf, non-binary masks, statistics with no tokens) need the device to report back;
they run only when the caller opts in with ``check_values=True``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import torch

from ess_po.types import ESS_SCOPES, ESSStats


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, value: Any, *, optional: bool = False) -> None:
    if not isinstance(value, torch.Tensor):
        what = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(
            f"{name} must be {what}, got {type(value).__name__}; convert it with "
            f"torch.as_tensor({name})."
        )


def check_dim(dim: int | None, t: torch.Tensor) -> int | None:
    """``dim`` as a non-negative index into ``t``'s dimensions (``None`` stays ``None``)."""
    if dim is None:
        return None
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int or None, got {type(dim).__name__}.")
    if not -t.dim() <= dim < t.dim():
        raise ValueError(
            f"dim={dim} is out of range for log_ratio with {t.dim()} dimension(s) "
            f"(shape {tuple(t.shape)}); use dim=-1 for one ESS per sequence or dim=None for one "
            f"over all tokens."
        )
    return dim % t.dim()


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
        check_tensor(name, t)
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
            raise ValueError(
                f"{name} must be a floating-point tensor, got {_describe(t)}; pass {name}.float()."
            )
    if mask.is_complex():
        raise ValueError(f"mask must be bool or real-valued 0/1, got {_describe(mask)}.")


def check_normalizer(
    normalizer: Any, loss_agg_mode: str, device: torch.device
) -> float | torch.Tensor | None:
    """The normalizer as a Python number or a detached 0-dim tensor (metadata checks only).

    A Python number stays a Python number: dividing by it passes it to the kernel as an
    argument, where building a tensor from it would be a host-to-device copy.
    """
    if normalizer is None:
        return None
    if loss_agg_mode == "token-sum":
        raise ValueError("normalizer is not used with loss_agg_mode='token-sum'; drop it.")
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(
                f"normalizer must be a number or a one-element tensor, got shape "
                f"{tuple(normalizer.shape)}."
            )
        if normalizer.device != device and normalizer.device.type != "cpu":
            raise ValueError(
                f"normalizer is on {normalizer.device} but logp_new is on {device}; pass a "
                f"Python number or a tensor on {device}."
            )
        # A CPU one-element tensor is used as a scalar by kernels on any device: no copy.
        return normalizer.detach().reshape(())
    # Comparisons only (no float(), no math.isfinite): under torch.compile a Python int that
    # changes between calls arrives as a symbolic int, and these stay in the graph as guards.
    if isinstance(normalizer, bool) or not isinstance(
        normalizer, numbers.Real | torch.SymInt | torch.SymFloat
    ):
        ok = False
    elif isinstance(normalizer, int | torch.SymInt):
        ok = normalizer > 0
    else:
        ok = 0 < normalizer < math.inf  # NaN fails both comparisons
    if not ok:
        # A symbolic number cannot be formatted while compiling; an eager call shows the value.
        got = "" if torch.compiler.is_compiling() else f", got {normalizer!r}"
        raise ValueError(
            "normalizer must be a finite positive number (tokens or sequences in the optimizer "
            "batch, summed over micro-batches and ranks)" + got + "."
        )
    # numpy scalars become Python floats; ints and symbolic numbers are divided by as they are.
    symbolic = isinstance(normalizer, int | torch.SymInt | torch.SymFloat)
    return normalizer if symbolic else float(normalizer)


def resolve_scope(ess_scope: str | None, stats: Any) -> str:
    """The ESS scope a call runs with: ``None`` means ``"step"`` with ``stats``, else ``"call"``.

    The old name ``"batch"`` (one ESS over the call's tokens, or over ``stats``) still works and
    warns."""
    if ess_scope == "batch":
        new = "call" if stats is None else "step"
        warnings.warn(
            f"ess_scope='batch' is deprecated; it is ess_scope={new!r} here ('call': one ESS per "
            "loss call; 'step': one ESS over precomputed step statistics, stats=...).",
            FutureWarning,
            stacklevel=4,
        )
        return new
    if ess_scope is None:
        return "call" if stats is None else "step"
    check_choice("ess_scope", ess_scope, ESS_SCOPES)
    if ess_scope == "step" and stats is None:
        raise ValueError(
            "ess_scope='step' needs the step's statistics: pass stats=step_stats(...) (every "
            "micro-batch and rank of the optimizer step), or use ess_scope='call'."
        )
    if ess_scope == "call" and stats is not None:
        raise ValueError(
            "stats= gives one ESS over the statistics' tokens (the step scope); pass "
            "ess_scope='step' (or leave ess_scope unset), or drop stats for one ESS per call."
        )
    return ess_scope


def check_stats(stats: Any, ess_scope: str, device: torch.device) -> None:
    """Metadata checks for precomputed ``stats`` (see :func:`ess_po.step_stats`)."""
    if not isinstance(stats, ESSStats):
        raise ValueError(
            f"stats must be an ESSStats (from ess_po.ess_stats / step_stats), got "
            f"{type(stats).__name__}."
        )
    if ess_scope == "sequence":
        raise ValueError(
            "stats cannot be used with ess_scope='sequence' (each sequence has its own ESS); use "
            "ess_scope='step' or drop stats."
        )
    for name, t in stats._asdict().items():
        if not isinstance(t, torch.Tensor) or t.dim() != 0:
            got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"stats.{name} must be a 0-dim tensor (batch statistics), got {got}; build them "
                f"with ess_stats(log_ratio, mask) (no dim) or step_stats(...)."
            )
        if t.device != device:
            raise ValueError(
                f"stats is on {t.device} but logp_new is on {device}; build the statistics on "
                f"the loss's device."
            )
        if not t.is_floating_point():
            raise ValueError(f"stats.{name} must be floating point, got {t.dtype}.")


def check_loss_values(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    rollout_weights: torch.Tensor | None,
    stats: Any,
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
    if stats is not None:
        values = torch.stack(list(stats))
        not_finite = ValueError(
            f"stats has values that are not finite: {stats}; a NaN or inf log ratio at a valid "
            f"position of the step gives this."
        )
        if bool(torch.isnan(values).any()):
            raise not_finite
        if not bool(stats.count > 0):
            raise ValueError(
                "stats has no valid tokens (count 0); build it from the step's log ratios and "
                "masks, or drop stats."
            )
        if not bool(torch.isfinite(values).all()):
            raise not_finite


def check_normalizer_value(normalizer: float | torch.Tensor | None) -> None:
    """Opt-in: a tensor normalizer is finite and positive (synchronises with the device)."""
    if isinstance(normalizer, torch.Tensor) and not bool(
        torch.isfinite(normalizer) & (normalizer > 0)
    ):
        raise ValueError(f"normalizer must be finite and positive, got {normalizer}.")
