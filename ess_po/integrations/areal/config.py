"""``ESSActorConfig``: AReaL's ``PPOActorConfig`` plus the ESS options, and ``ESSGRPOConfig``.

A plain ``PPOActorConfig`` also works: the ESS options then keep their defaults
(:func:`ess_options`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from areal.api.cli_args import GRPOConfig, PPOActorConfig

__all__ = ["ESS_SCOPES", "ESSActorConfig", "ESSGRPOConfig", "ESSOptions", "ess_options"]

#: ``ess_scope`` values of the AReaL loss: one ESS per optimizer step (``engine.train_batch``,
#: every micro-batch, every data-parallel rank) or per loss call (one micro-batch on one rank).
ESS_SCOPES = ("step", "call")


@dataclass
class ESSActorConfig(PPOActorConfig):
    """``PPOActorConfig`` plus the options of the ESS objective (all optional).

    Every ``PPOActorConfig`` field keeps its meaning, except the clipped surrogate's own
    (``eps_clip``, ``eps_clip_higher``, ``c_clip``), which the ESS objective does not have.

    Args:
        ess_scope: the tokens one ESS is computed over. ``"step"`` (default): every valid token
            of the optimizer step (one ``engine.train_batch``: all its micro-batches on all
            data-parallel ranks), so the ESS does not depend on AReaL's micro-batch split.
            ``"call"``: the valid tokens of one loss call (one micro-batch on one rank, no
            collective: AReaL skips the loss of a micro-batch without valid tokens).
        ess_free_path: in step scope, take the step's current log-probs from AReaL's recomputed
            proximal log-probs (``prox_logp``) when no optimizer step has run since
            ``compute_logp`` (the first mini-batch of an update), instead of a no-grad forward.
        ess_check_values: enable the core's host-syncing value checks (debugging only).
    """

    ess_scope: str = field(
        default="step",
        metadata={
            "help": "The tokens one ESS is computed over: 'step' (the optimizer step) or 'call' "
            "(one micro-batch on one rank).",
            "choices": list(ESS_SCOPES),
        },
    )
    ess_free_path: bool = field(
        default=True,
        metadata={
            "help": "Step scope: reuse the recomputed proximal log-probs as the step's current "
            "log-probs when no optimizer step ran since compute_logp (no extra forward)."
        },
    )
    ess_check_values: bool = field(
        default=False,
        metadata={"help": "Check loss inputs for non-finite values (synchronises with the host)."},
    )

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        check_scope(self.ess_scope)


@dataclass
class ESSGRPOConfig(GRPOConfig):
    """AReaL's ``GRPOConfig`` whose ``actor`` is an :class:`ESSActorConfig`, so that the ESS
    options can be set in the experiment YAML (``actor.ess_scope: step``)."""

    actor: ESSActorConfig = field(default_factory=ESSActorConfig)


class ESSOptions(NamedTuple):
    """The ESS options of an actor config (defaults for a plain ``PPOActorConfig``)."""

    ess_scope: str = "step"
    free_path: bool = True
    check_values: bool = False


def check_scope(scope: Any) -> str:
    """``scope`` if it is one of :data:`ESS_SCOPES`, else a ``ValueError`` naming the choices."""
    if scope not in ESS_SCOPES:
        hint = (
            " One ESS per sequence needs per-sequence reductions of AReaL's packed micro-batches, "
            "which this adapter does not do; use 'step' or 'call'."
            if scope == "sequence"
            else ""
        )
        raise ValueError(
            f"ess_scope must be one of {ESS_SCOPES}, got {scope!r}.{hint} Set actor.ess_scope "
            "to 'step' (one ESS per optimizer step) or 'call' (one per micro-batch)."
        )
    return scope


def ess_options(config: Any) -> ESSOptions:
    """The ESS options of ``config`` (an :class:`ESSActorConfig`, or defaults for any other)."""
    return ESSOptions(
        check_scope(getattr(config, "ess_scope", "step")),
        bool(getattr(config, "ess_free_path", True)),
        bool(getattr(config, "ess_check_values", False)),
    )
