"""``ESSGRPOTrainer``: TRL's ``GRPOTrainer`` with the ESS objective instead of the clipped surrogate.

Usage is a one-line change::

    from ess_po.integrations.trl import ESSGRPOTrainer

    trainer = ESSGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)

Generation, rewards, advantages, reference model, PEFT, callbacks, checkpointing and
evaluation are TRL's, unchanged. Only the policy objective in ``_compute_loss`` differs: the
per-token log-probabilities are computed with TRL's own ``_get_per_token_logps_and_entropies``
and passed to :func:`ess_po.ess_policy_loss`. Requires the ``trl`` extra (TRL 1.16).

ESS options (``ess_scope``, ``ess_window``, ``use_sampling_logps``, ``ess_check_values``) are
fields of :class:`ESSGRPOConfig`, a ``GRPOConfig`` subclass; the trainer's constructor is
``GRPOTrainer``'s. See ``docs/trl.md`` for the mapping of GRPOConfig options.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

try:
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import nanmax, nanmin
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'ess_po.integrations.trl needs TRL 1.16: pip install -e ".[trl]" in a checkout of '
        'ess-po (pip install "ess-po[trl]" once released).'
    ) from err

from ess_po import ESSStats, ess_policy_loss, step_stats
from ess_po.aggregation import aggregate

__all__ = ["SUPPORTED_LOSS_TYPES", "ESSGRPOConfig", "ESSGRPOTrainer"]

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

# inputs keys that TRL's `_compute_loss` forwards to `_get_per_token_logps_and_entropies`
# (multimodal / token-type fields); pinned by tests/test_trl_contract.py
MODEL_INPUT_KEYS: tuple[str, ...] = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)

# (metric name, core diagnostic, cross-process reduction)
_ESS_METRICS: tuple[tuple[str, str, str], ...] = (
    ("ess/mean", "ess", "mean"),
    ("ess/min", "ess_min", "min"),
    ("ess/capped_frac", "capped_frac", "mean"),
    ("ess/capped_mass", "capped_mass", "mean"),
    ("ess/kl_behavior", "kl_behavior", "mean"),
    ("ess/ratio_mean", "ratio_mean", "mean"),
    ("ess/ratio_max", "ratio_max", "max"),
    ("ess/ratio_min", "ratio_min", "min"),
    ("ess/regularizer_loss", "regularizer_loss", "mean"),
)


_ESS_SCOPES = ("batch", "sequence")
_ESS_WINDOWS = ("micro_batch", "step")


@dataclass
class ESSGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the options of the ESS objective (all optional).

    ``ESSGRPOTrainer`` also takes a plain ``GRPOConfig``; the fields below then keep their
    defaults. Every ``GRPOConfig`` field keeps its meaning (see ``docs/trl.md`` for the mapping).

    Args:
        ess_scope: ``"batch"`` (default: one ESS over the valid tokens of ``ess_window``, all
            data-parallel ranks included) or ``"sequence"`` (one ESS per sequence); passed to
            :func:`ess_po.ess_policy_loss`.
        use_sampling_logps: when the inputs carry the rollout engine's log-probabilities
            (``sampling_per_token_logps``: vLLM or a custom rollout), use them as the behaviour
            policy of the ESS objective (default ``True``). ``False`` keeps TRL's behaviour policy
            (``old_per_token_logps``) and TRL's importance-sampling ratio as a token weight.
        ess_window: the tokens one batch ESS is computed over in training. ``"step"``
            (default): all valid tokens of the optimizer step (every gradient-accumulation
            micro-batch, every data-parallel rank), computed before the step's first backward
            (:func:`ess_po.step_stats`), so the ESS and the step's gradient do not depend on
            ``per_device_train_batch_size`` or the accumulation split. It is free on the first
            optimizer step after a generation when TRL's ``old_per_token_logps`` are in the inputs
            or no sampler log-probs are used (the ratios are then in hand), else one no-grad
            forward per micro-batch. It needs ``steps_per_generation`` to be a multiple of
            ``gradient_accumulation_steps`` (TRL's default: equal). ``"micro_batch"``: each loss
            call's tokens, all-reduced over data-parallel ranks, as the authors' reference
            implementation; the ESS then depends on the micro-batch size. The window applies to
            ``ess_scope="batch"`` only: with ``"sequence"`` each sequence's ESS is over its own
            tokens whatever the split, and the window is ignored. Evaluation uses each loss
            call's tokens (evaluation has no optimizer step).
        ess_check_values: enable the core's host-syncing value checks (debugging only).
    """

    ess_scope: str = field(
        default="batch",
        metadata={
            "help": "'batch' (one ESS over the ess_window's tokens, all ranks) or 'sequence' (one ESS per "
            "sequence)."
        },
    )
    use_sampling_logps: bool = field(
        default=True,
        metadata={
            "help": "Use the rollout engine's log-probabilities as the ESS behaviour policy when present."
        },
    )
    ess_window: str = field(
        default="step",
        metadata={
            "help": "'step' (one ESS per optimizer step) or 'micro_batch' (one ESS per loss call); "
            "batch scope only."
        },
    )
    ess_check_values: bool = field(
        default=False,
        metadata={
            "help": "Check loss inputs for non-finite values (synchronises with the device)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _validate_ess_options(self)


def _validate_ess_options(args: Any) -> None:
    scope = getattr(args, "ess_scope", "batch")
    if scope not in _ESS_SCOPES:
        raise ValueError(
            f"ess_scope must be one of {_ESS_SCOPES}, got {scope!r}. Use 'batch' for one ESS over the "
            "ess_window's tokens or 'sequence' for one ESS per sequence."
        )
    window = getattr(args, "ess_window", "step")
    if window not in _ESS_WINDOWS:
        raise ValueError(
            f"ess_window must be one of {_ESS_WINDOWS}, got {window!r}. Use 'step' for one ESS per "
            "optimizer step or 'micro_batch' for one ESS per loss call."
        )
    # A per-sequence ESS does not depend on the split: the window applies to batch scope only.
    if window == "step" and scope == "batch":
        spg, accum = args.steps_per_generation, args.gradient_accumulation_steps
        if spg is not None and spg % accum != 0:
            raise ValueError(
                f"ess_window='step' (the default) needs every optimizer step's micro-batches "
                f"generated before its first backward: steps_per_generation ({spg}) must be a "
                f"multiple of gradient_accumulation_steps ({accum}). Set steps_per_generation to "
                f"{accum} (TRL's default) or a multiple of it, or use one ESS per loss call: "
                "ESSGRPOConfig(ess_window='micro_batch')."
            )


def _validate_args(args: GRPOConfig | None) -> None:
    """Refuse options that would bypass or contradict the ESS objective; warn on inert ones."""
    if args is None:  # GRPOTrainer builds a default GRPOConfig: nothing to check
        return
    _validate_ess_options(args)
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


_GRPO_INIT_SIGNATURE = inspect.signature(GRPOTrainer.__init__)


class ESSGRPOTrainer(GRPOTrainer):
    """TRL ``GRPOTrainer`` whose policy objective is the ESS loss (:func:`ess_po.ess_policy_loss`).

    Drop-in: ``__init__`` takes exactly ``GRPOTrainer.__init__``'s parameters (same names, order
    and defaults; ``tests/test_trl_contract.py`` pins it). ESS options live in
    :class:`ESSGRPOConfig`; a plain ``GRPOConfig`` gives their defaults. Differences from
    ``GRPOTrainer``:

    * Objective. Per token, ``-sg(min(w, ESS)) * A * logp + (1 - ESS) * (d + exp(-d) - 1)`` with
      ``d = logp - logp_old`` and the ESS of the ratios ``w = exp(d)`` over the valid tokens of the
      optimizer step (every accumulation micro-batch, all data-parallel ranks: ``ess_window=
      "step"``, the default), so the update does not depend on how the step is split into
      micro-batches; ``ess_window="micro_batch"`` takes the tokens of each loss call instead, and
      ``ess_scope="sequence"`` one ESS per sequence (the window does not apply). On-policy ESS is
      1 and the gradient equals ``GRPOTrainer``'s (REINFORCE with TRL's advantages and
      normalisation).
    * Normalisation follows ``loss_type``: ``"dapo"`` (default: tokens of the whole accumulated
      batch), ``"bnpo"``, ``"dr_grpo"``, ``"grpo"``, ``"luspo"``. ``"cispo"``, ``"sapo"`` and
      ``"vespo"`` are different objectives and raise. ``epsilon``, ``epsilon_high`` and ``delta``
      have no meaning here and trigger one warning.
    * Behaviour policy (``logp_old`` of the ESS term). When the inputs carry the rollout engine's
      own log-probabilities (``sampling_per_token_logps``: vLLM or a custom ``rollout_func``) they
      are ``logp_old`` (``use_sampling_logps=True``, default): the ESS then measures the whole
      mismatch between the sampler and the policy being trained, and TRL's truncated
      importance-sampling ratio is *not* applied on top. Tokens whose sampling log-probability is
      NaN fall back to TRL's ``old_per_token_logps``. With ``use_sampling_logps=False``,
      ``logp_old`` is TRL's ``old_per_token_logps`` and TRL's ratio weights the policy term, as in
      ``GRPOTrainer``.
    * Identical to TRL in both settings: ``off_policy_mask_threshold`` (TRL's mask, computed from
      ``sampling_per_token_logps`` when present, else ``old_per_token_logps``), the KL to the
      reference model with ``beta`` and ``use_bias_correction_kl`` (weight
      ``exp(logp - old_per_token_logps)``), ``top_entropy_quantile`` (multiplies the policy term),
      a static ``entropy_coef`` bonus, the MoE auxiliary loss, ``mask_truncated_completions`` and
      tool masks (TRL's completion mask).
    * Refused with an error naming the fix: ``use_liger_kernel=True``,
      ``importance_sampling_level="sequence"``, ``use_adaptive_entropy=True``.
    * Metrics: ``ess/mean``, ``ess/min``, ``ess/capped_frac``, ``ess/capped_mass``,
      ``ess/kl_behavior``, ``ess/ratio_mean``, ``ess/ratio_max``, ``ess/ratio_min``,
      ``ess/regularizer_loss``, plus TRL's ``policy_loss``, ``entropy`` and ``kl``; gathered across
      processes like TRL's clip ratios (mean; ``ess/min`` and ``ess/ratio_min`` the minimum,
      ``ess/ratio_max`` the maximum).
    """

    _tag_names: ClassVar[list[str]] = ["trl", "grpo", "ess-po"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Same parameters as GRPOTrainer: bind to its signature (TypeError as GRPOTrainer would
        # raise it), check the config before TRL builds anything, then let TRL do the rest.
        bound = _GRPO_INIT_SIGNATURE.bind(self, *args, **kwargs)
        _validate_args(bound.arguments.get("args"))
        super().__init__(*args, **kwargs)
        self.ess_scope: str = getattr(self.args, "ess_scope", "batch")
        self.use_sampling_logps: bool = getattr(self.args, "use_sampling_logps", True)
        self.ess_check_values: bool = getattr(self.args, "ess_check_values", False)
        self.ess_window: str = getattr(self.args, "ess_window", "step")
        self._ess_step_stats: ESSStats | None = None
        if self.use_vllm and self.vllm_importance_sampling_correction and self.use_sampling_logps:
            warnings.warn(
                "ESSGRPOTrainer uses vLLM's sampling log-probabilities as the behaviour policy; TRL's "
                "truncated importance-sampling ratio (vllm_importance_sampling_correction) is not applied "
                "on top. Set `vllm_importance_sampling_correction=False` to skip computing it.",
                UserWarning,
                stacklevel=2,
            )

    __init__.__signature__ = _GRPO_INIT_SIGNATURE  # type: ignore[attr-defined]

    # -- helpers -----------------------------------------------------------------------------

    def _behaviour_logps(
        self, inputs: dict[str, Any], per_token_logps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(trl_old, logp_old)``: TRL's ``old_per_token_logps`` and the ESS behaviour policy.

        ``trl_old`` is what GRPOTrainer calls ``old_per_token_logps`` (``per_token_logps.detach()``
        when TRL skipped it on-policy). ``logp_old`` is the sampler's log-probabilities where
        present and finite and ``use_sampling_logps`` holds, else ``trl_old``.
        """
        old = inputs.get("old_per_token_logps")
        trl_old = per_token_logps.detach() if old is None else old
        sampling = inputs.get("sampling_per_token_logps")
        if sampling is None or not self.use_sampling_logps:
            return trl_old, trl_old
        return trl_old, torch.where(torch.isnan(sampling), trl_old, sampling)

    def _normalisation(
        self, inputs: dict[str, Any], mask: torch.Tensor, mode: str
    ) -> tuple[str, torch.Tensor | float, float]:
        """(loss_agg_mode, normalizer, scale to TRL's logged policy_loss) for ``self.loss_type``.

        Matches the normalisers in TRL 1.16 ``GRPOTrainer._compute_loss``: every loss type is
        scaled for gradient accumulation there (``loss_is_scaled_for_ga``), so the factor
        ``accum`` is folded into the normaliser. ``dapo``'s normaliser is the token count of one
        accumulation window per process (DDP averages gradients over processes).
        """
        accum = float(self.current_gradient_accumulation_steps) if mode == "train" else 1.0
        batch = float(mask.size(0))
        if self.loss_type == "dapo":
            n = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":  # num_items_in_batch spans the whole generation batch
                n = n * accum / self.args.steps_per_generation
            return "token-mean", n, 1.0
        if self.loss_type == "bnpo":
            return "token-mean", mask.sum().clamp(min=1.0) * accum, accum
        if self.loss_type == "dr_grpo":
            return "token-mean", batch * self.max_completion_length * accum, accum
        # grpo: mean over sequences of the per-sequence token mean; luspo: of the token sum
        return SUPPORTED_LOSS_TYPES[self.loss_type], batch * accum, accum

    @staticmethod
    def _loss_mask(inputs: dict[str, Any]) -> torch.Tensor:
        """TRL's loss mask: completion tokens, minus tool results (float32, (B, T))."""
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        return mask.to(torch.float32)

    def _policy_logps(
        self, model: torch.nn.Module, inputs: dict[str, Any], *, compute_entropy: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """TRL's ``_get_per_token_logps_and_entropies`` on the inputs, as TRL's loss calls it."""
        completion_ids = inputs["completion_ids"]
        return self._get_per_token_logps_and_entropies(
            model,
            torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
            completion_ids.size(1),
            compute_entropy=compute_entropy,
            compute_aux_loss=self.aux_loss_enabled and compute_entropy,
            **{key: inputs.get(key) for key in MODEL_INPUT_KEYS},
        )

    @torch.no_grad()
    def _step_ess_stats(self) -> ESSStats:
        """ESS statistics of the optimizer step that starts now (``ess_window="step"``).

        The step's micro-batches are TRL's buffered ``_buffered_inputs[(_step + j) %
        steps_per_generation]``, ``j < gradient_accumulation_steps`` (all generated already:
        ``steps_per_generation`` is a multiple of the accumulation steps). Each contributes the
        log ratios ``log pi_theta - logp_old`` of its valid tokens under the current parameters:

        * free on the first optimizer step after a generation, where the parameters are those
          that produced TRL's ``old_per_token_logps``: the ratios are ``old - logp_old`` (zero
          without sampler log-probs, and also when TRL skipped ``old_per_token_logps``);
        * otherwise from one no-grad forward per micro-batch (``model`` as the loss sees it,
          dropout included when enabled).

        The statistics are merged over micro-batches and all-reduced over ranks
        (:func:`ess_po.step_stats`): every rank calls this at the same micro-batch.
        """
        accum = self.current_gradient_accumulation_steps
        spg = self.args.steps_per_generation
        fresh = self._step % (spg * self.num_iterations) == 0  # params as at generation
        parts = []
        for j in range(accum):
            inputs = self._buffered_inputs[(self._step + j) % spg]
            mask = self._loss_mask(inputs)
            old = inputs.get("old_per_token_logps")
            sampling = inputs.get("sampling_per_token_logps") if self.use_sampling_logps else None
            if fresh and (old is not None or sampling is None):
                current = old if old is not None else torch.zeros_like(mask)
            else:
                current = self._policy_logps(self.model, inputs, compute_entropy=False)[0]
            _, logp_old = self._behaviour_logps(inputs, current)
            parts.append((current - logp_old, mask))
        return step_stats(parts)

    # -- the hook ----------------------------------------------------------------------------

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        mode = "train" if self.model.training else "eval"
        mask = self._loss_mask(inputs)
        per_token_logps, entropies, aux_loss = self._policy_logps(model, inputs)
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        trl_old, logp_old = self._behaviour_logps(inputs, per_token_logps)

        # Token weights on the policy term, as TRL multiplies them into its per-token loss.
        weights: torch.Tensor | None = None
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(
                entropies, mask, 1 - self.top_entropy_quantile
            )
            weights = entropy_mask.to(mask.dtype)
        if self.off_policy_mask_threshold is not None:
            # TRL's mask on TRL's log-probs (the sampler's when present: it sees both the drift
            # from updates and the engine mismatch), whichever logp_old the ESS term uses.
            keep = self.get_off_policy_mask(
                advantages,
                per_token_logps,
                inputs.get("sampling_per_token_logps", trl_old),
                mask,
                self.off_policy_mask_threshold,
            )
            weights = keep if weights is None else weights * keep
        if (
            not self.use_sampling_logps
            and self.use_vllm
            and self.vllm_importance_sampling_correction
        ):
            ratio = inputs["importance_sampling_ratio"]  # (B, T) or (B, 1), as TRL applies it
            weights = ratio if weights is None else weights * ratio
        if weights is not None:
            weights = weights.expand_as(mask)

        stats = None
        if self.ess_window == "step" and self.ess_scope == "batch" and mode == "train":
            if self._step % self.current_gradient_accumulation_steps == 0:  # the step's first call
                self._ess_step_stats = self._step_ess_stats()
            stats = self._ess_step_stats

        agg_mode, normalizer, log_scale = self._normalisation(inputs, mask, mode)
        out = ess_policy_loss(
            per_token_logps,
            logp_old,  # may be float32 beside bf16 logp_new (vLLM); the core computes in float32
            advantages,
            mask,
            loss_agg_mode=agg_mode,
            normalizer=normalizer,
            ess_scope=self.ess_scope,
            rollout_weights=weights,
            stats=stats,
            check_values=self.ess_check_values,
        )
        loss = out.loss

        # KL to the reference model: TRL's k3 estimator, added per token and normalised like the
        # policy term. use_bias_correction_kl weighs it by exp(logp - old_per_token_logps), as TRL
        # does: the ratio to the sampler would be uncapped here (the ESS cap acts on the policy term).
        per_token_kl = None
        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"]
            per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
            if self.args.use_bias_correction_kl:
                per_token_kl = per_token_kl * torch.exp(per_token_logps - trl_old)
            # The core's aggregation, as for the policy term (it expects 0 at masked tokens).
            kl = aggregate(per_token_kl * mask, mask.bool(), agg_mode, normalizer)
            loss = loss + self.beta * kl
        policy_loss = loss.detach() * log_scale

        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        # Static entropy bonus, as TRL: mean entropy over the (entropy-masked) tokens / accumulation.
        if self.entropy_coef != 0.0:
            active = mask if entropy_mask is None else mask * entropy_mask
            entropy = (entropies * active).sum() / active.sum().clamp(min=1.0)
            loss = loss - self.entropy_coef * entropy / accum
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        if self.aux_loss_enabled:  # MoE router load-balancing loss, as TRL
            loss = loss + self.router_aux_loss_coef * aux_loss / accum

        self._log_ess_metrics(
            mode, out.metrics(), policy_loss, entropies, per_token_kl, aux_loss, mask
        )
        return loss

    @torch.no_grad()
    def _log_ess_metrics(
        self,
        mode: str,
        ess_metrics: dict[str, torch.Tensor],
        policy_loss: torch.Tensor,
        entropies: torch.Tensor,
        per_token_kl: torch.Tensor | None,
        aux_loss: torch.Tensor | None,
        mask: torch.Tensor,
    ) -> None:
        """One gather and one host transfer for all metrics (TRL gathers its clip ratios the same way)."""
        kl_sum = (per_token_kl * mask).sum() if per_token_kl is not None else mask.new_zeros(())
        aux = aux_loss.detach().float() if aux_loss is not None else mask.new_zeros(())
        local = [ess_metrics[key].float() for _, key, _ in _ESS_METRICS]
        local += [
            policy_loss.float(),
            (entropies * mask).sum().float(),
            kl_sum.float(),
            mask.sum(),
            aux,
        ]
        gathered = self.accelerator.gather(torch.stack(local).unsqueeze(0))  # (num_processes, K)
        reduce = {"mean": lambda x: x.nanmean(), "min": nanmin, "max": nanmax}
        values = [reduce[how](gathered[:, i]) for i, (_, _, how) in enumerate(_ESS_METRICS)]
        k = len(_ESS_METRICS)
        count = gathered[:, k + 3].sum().clamp(min=1.0)
        values += [
            gathered[:, k].nanmean(),  # policy_loss
            gathered[:, k + 1].sum() / count,  # entropy: global token mean, as TRL
            gathered[:, k + 2].sum() / count,  # kl: global token mean, as TRL
            gathered[:, k + 4].mean(),  # aux_loss
        ]
        floats = torch.stack(values).tolist()  # the only host sync
        names = [name for name, _, _ in _ESS_METRICS] + ["policy_loss", "entropy", "kl", "aux_loss"]
        for name, value in zip(names, floats, strict=True):
            if (name == "kl" and per_token_kl is None) or (name == "aux_loss" and aux_loss is None):
                continue
            self._metrics[mode][name].append(value)
