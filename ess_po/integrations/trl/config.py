"""``ESSGRPOConfig``: ``GRPOConfig`` plus the ESS options, and the checks of a config."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig

__all__ = ["SUPPORTED_LOSS_TYPES", "ESSGRPOConfig"]

#: TRL ``loss_type`` values whose *normalisation* ESSGRPOTrainer reproduces (their clipping is
#: replaced by the ESS objective). Maps to the core's ``loss_agg_mode``.
SUPPORTED_LOSS_TYPES: dict[str, str] = {
    "dapo": "token-mean",  # TRL default: tokens of the whole accumulated batch
    "bnpo": "token-mean",  # tokens of the local micro-batch
    "dr_grpo": "token-mean",  # fixed B * max_completion_length
    "grpo": "seq-mean-token-mean",
    "luspo": "seq-mean-token-sum",
}
# loss types that define a different objective rather than a normalisation
_OTHER_OBJECTIVES = ("cispo", "sapo", "vespo")

ESS_SCOPES = ("step", "call", "sequence")
_OLD_WINDOWS = {"micro_batch": "call", "step": "step"}  # deprecated ess_window -> ess_scope


@dataclass
class ESSGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the options of the ESS objective (all optional).

    ``ESSGRPOTrainer`` also takes a plain ``GRPOConfig``; the fields below then keep their
    defaults. Every ``GRPOConfig`` field keeps its meaning.

    Args:
        ess_scope: the tokens one ESS is computed over. ``"step"`` (default): all valid tokens
            of the optimizer step (every accumulation micro-batch, every data-parallel rank), so
            the ESS does not depend on the micro-batch split; it needs ``steps_per_generation``
            to be a multiple of ``gradient_accumulation_steps``, else the trainer warns and uses
            ``"call"``. ``"call"``: the valid tokens of each loss call, all-reduced over ranks.
            ``"sequence"``: one ESS per sequence. Evaluation uses ``"call"`` for ``"step"``.
        use_sampling_logps: when the inputs carry the rollout engine's log-probabilities
            (``sampling_per_token_logps``), use them as the behaviour policy (default ``True``);
            ``False`` keeps TRL's ``old_per_token_logps`` and TRL's importance-sampling ratio.
        ess_window: deprecated (FutureWarning): ``"micro_batch"`` is ``ess_scope="call"``,
            ``"step"`` is ``ess_scope="step"``.
        ess_check_values: enable the core's host-syncing value checks (debugging only).
    """

    ess_scope: str = field(
        default="step",
        metadata={
            "help": "The tokens one ESS is computed over: 'step' (the optimizer step), 'call' (one "
            "loss call) or 'sequence' (one ESS per sequence)."
        },
    )
    use_sampling_logps: bool = field(
        default=True,
        metadata={
            "help": "Use the rollout engine's log-probabilities as the ESS behaviour policy when present."
        },
    )
    ess_window: str | None = field(
        default=None,
        metadata={"help": "Deprecated: use ess_scope ('micro_batch' -> 'call', 'step' -> 'step')."},
    )
    ess_check_values: bool = field(
        default=False,
        metadata={
            "help": "Check loss inputs for non-finite values (synchronises with the device)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.ess_scope = resolve_ess_scope(self.ess_scope, self.ess_window)
        self.ess_window = None  # folded into ess_scope: a saved config does not warn again


def resolve_ess_scope(scope: str, window: str | None = None) -> str:
    """The ``ess_scope`` for old spellings (FutureWarning): ``"batch"`` and ``ess_window``."""
    if window is not None:
        if window not in _OLD_WINDOWS:
            raise ValueError(
                f"ess_window must be one of {tuple(_OLD_WINDOWS)}, got {window!r}; it is deprecated: "
                "use ess_scope='step' (one ESS per optimizer step) or 'call' (one per loss call)."
            )
        new = _OLD_WINDOWS[window]
        warnings.warn(
            f"ESSGRPOConfig(ess_window={window!r}) is deprecated: use ess_scope={new!r}.",
            FutureWarning,
            stacklevel=4,
        )
        if scope == "call" and new == "step":
            raise ValueError(
                "ess_scope='call' and ess_window='step' contradict each other; drop ess_window and "
                "set ess_scope='step' (one ESS per optimizer step) or 'call' (one per loss call)."
            )
        if scope in ("batch", "step"):
            if scope == "batch":
                warnings.warn(
                    f"ess_scope='batch' is deprecated: use ess_scope={new!r}.",
                    FutureWarning,
                    stacklevel=4,
                )
            return new
        # "sequence": the window never applied to a per-sequence ESS
    elif scope == "batch":
        warnings.warn(
            "ess_scope='batch' is deprecated: use ess_scope='step' (one ESS per optimizer step, the "
            "default) or 'call' (one per loss call).",
            FutureWarning,
            stacklevel=4,
        )
        return "step"
    if scope not in ESS_SCOPES:
        raise ValueError(
            f"ess_scope must be one of {ESS_SCOPES}, got {scope!r}. Use 'step' for one ESS per "
            "optimizer step, 'call' for one per loss call or 'sequence' for one per sequence."
        )
    return scope


def step_scope_fallback(args: Any, scope: str) -> str:
    """``"call"`` with a warning when a step's micro-batches are not all generated before its first
    backward (``steps_per_generation`` not a multiple of ``gradient_accumulation_steps``)."""
    spg, accum = args.steps_per_generation, args.gradient_accumulation_steps
    if scope != "step" or spg is None or spg % accum == 0:
        return scope
    warnings.warn(
        f"ess_scope='step' needs every micro-batch of an optimizer step generated before its first "
        f"backward, but steps_per_generation ({spg}) is not a multiple of "
        f"gradient_accumulation_steps ({accum}): using one ESS per loss call (ess_scope='call'), "
        "which depends on the micro-batch size. For one ESS per optimizer step set "
        f"steps_per_generation to a multiple of {accum} (TRL's default: equal); to silence this "
        "warning set ess_scope='call'.",
        UserWarning,
        stacklevel=4,
    )
    return "call"


def validate_args(args: Any) -> str:
    """Refuse options that would bypass or contradict the ESS objective; warn on inert ones.

    Returns the ESS scope the trainer uses (``"step"`` for ``args=None``: TRL's default config).
    """
    if args is None:  # GRPOTrainer builds a default GRPOConfig: nothing to check
        return "step"
    # an ESSGRPOConfig is resolved already; a plain GRPOConfig has the defaults
    scope = resolve_ess_scope(getattr(args, "ess_scope", "step"), getattr(args, "ess_window", None))
    if getattr(args, "use_liger_kernel", False):
        raise ValueError(
            "ESSGRPOTrainer does not support `use_liger_kernel=True`: a Liger GRPO loss computes the "
            "clipped objective in its own fused kernel and would bypass the ESS objective (TRL 1.16 "
            "already limits the flag to layer kernels and deprecates it). Set `use_liger_kernel=False`; "
            'fused layer kernels remain available via `model_init_kwargs={"use_kernels": True}`.'
        )
    if args.loss_type in _OTHER_OBJECTIVES:
        raise ValueError(
            f"loss_type={args.loss_type!r} defines its own policy objective, which ESSGRPOTrainer replaces. "
            f"Use one of {sorted(SUPPORTED_LOSS_TYPES)} to choose the loss normalisation "
            "(default 'dapo': mean over the tokens of the whole accumulated batch), or use GRPOTrainer."
        )
    if args.loss_type not in SUPPORTED_LOSS_TYPES:
        raise ValueError(
            f"Unknown loss_type={args.loss_type!r}; ESSGRPOTrainer supports {sorted(SUPPORTED_LOSS_TYPES)}."
        )
    if args.importance_sampling_level != "token":
        raise ValueError(
            "ESSGRPOTrainer computes token-level ratios with a batch-level ESS; "
            f"importance_sampling_level={args.importance_sampling_level!r} (GSPO) has no meaning here. "
            "Set `importance_sampling_level='token'` (for one ESS per sequence use "
            "`ESSGRPOConfig(ess_scope='sequence')`)."
        )
    if args.use_adaptive_entropy:
        raise ValueError(
            "ESSGRPOTrainer does not implement TRL's adaptive entropy controller "
            "(`use_adaptive_entropy=True`). Use a static `entropy_coef` instead."
        )
    inert = []
    if args.epsilon != 0.2:
        inert.append(f"epsilon={args.epsilon}")
    if args.epsilon_high is not None:
        inert.append(f"epsilon_high={args.epsilon_high}")
    if args.delta is not None:
        inert.append(f"delta={args.delta}")
    if inert:
        warnings.warn(
            f"ESSGRPOTrainer ignores {', '.join(inert)}: the ESS objective has no clipping range. "
            "Remove these options to silence this warning.",
            UserWarning,
            stacklevel=3,
        )
    return step_scope_fallback(args, scope)
