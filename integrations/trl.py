"""``ESSGRPOTrainer``: TRL's ``GRPOTrainer`` with the ESS objective instead of the clipped surrogate.

Usage is a one-line change::

    from ess_po.integrations.trl import ESSGRPOTrainer

    trainer = ESSGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)

Generation, rewards, advantages, reference model, PEFT, callbacks, checkpointing and
evaluation are TRL's, unchanged. Only the policy objective in ``_compute_loss`` differs: the
per-token log-probabilities are computed with TRL's own ``_get_per_token_logps_and_entropies``
and passed to :func:`ess_po.ess_policy_loss`. Requires the ``trl`` extra (TRL 1.16).

See ``docs/trl.md`` for the mapping of GRPOConfig options.
"""

from __future__ import annotations

import warnings
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

from ess_po import ess_policy_loss

__all__ = ["SUPPORTED_LOSS_TYPES", "ESSGRPOTrainer"]

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

# (metric name, index in the stacked local statistics, cross-process reduction)
_ESS_METRICS: tuple[tuple[str, str, str], ...] = (
    ("ess/mean", "ess", "mean"),
    ("ess/min", "ess_min", "min"),
    ("ess/capped_frac", "capped_frac", "mean"),
    ("ess/kl_behavior", "kl_behavior", "mean"),
    ("ess/ratio_mean", "ratio_mean", "mean"),
    ("ess/ratio_max", "ratio_max", "max"),
    ("ess/regularizer_loss", "regularizer_loss", "mean"),
)


def _validate_args(args: GRPOConfig | None) -> None:
    """Refuse options that would bypass or contradict the ESS objective; warn on inert ones."""
    if args is None:  # GRPOTrainer builds a default GRPOConfig: nothing to check
        return
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
            "Set `importance_sampling_level='token'` (for a per-sequence ESS pass `ess_scope='sequence'`)."
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


class ESSGRPOTrainer(GRPOTrainer):
    """TRL ``GRPOTrainer`` whose policy objective is the ESS loss (:func:`ess_po.ess_policy_loss`).

    Drop-in: takes the same arguments as ``GRPOTrainer`` (``GRPOConfig``, datasets, reward
    functions, ``peft_config``, callbacks). Differences from ``GRPOTrainer``:

    * Objective. Per token, ``-sg(min(w, ESS)) * A * logp + (1 - ESS) * (d + exp(-d) - 1)`` with
      ``d = logp - logp_old`` and the batch ESS of the ratios ``w = exp(d)``, all-reduced over
      data-parallel ranks. On-policy (``num_iterations == 1`` and ``steps_per_generation ==
      gradient_accumulation_steps``) ESS is exactly 1 and the loss and gradient equal
      ``GRPOTrainer``'s (REINFORCE with TRL's advantages).
    * Normalisation follows ``loss_type``: ``"dapo"`` (default: tokens of the whole accumulated
      batch), ``"bnpo"``, ``"dr_grpo"``, ``"grpo"``, ``"luspo"``. ``"cispo"``, ``"sapo"`` and
      ``"vespo"`` are different objectives and raise. ``epsilon``, ``epsilon_high`` and ``delta``
      have no meaning here and trigger one warning.
    * Behaviour policy. When the inputs carry the rollout engine's own log-probabilities
      (``sampling_per_token_logps``: vLLM generation or a custom ``rollout_func``), they are
      ``logp_old``: the ESS then measures the full mismatch between the sampler and the policy
      being trained, which is what the ESS objective is built for, and TRL's separate truncated
      importance-sampling ratio (``vllm_importance_sampling_correction``) is *not* applied on top.
      Tokens whose sampling log-probability is NaN fall back to TRL's ``old_per_token_logps``.
      Pass ``use_sampling_logps=False`` to keep TRL's behaviour instead (``old_per_token_logps`` as
      ``logp_old`` and TRL's importance-sampling ratio as a rollout weight).
    * Kept from TRL: KL to the reference model with ``beta`` (TRL's estimator, including
      ``use_bias_correction_kl``), ``top_entropy_quantile`` masking (applied to the policy term),
      ``off_policy_mask_threshold``, a static ``entropy_coef`` bonus, the MoE auxiliary loss,
      ``mask_truncated_completions`` and tool masks (through TRL's completion mask).
    * Refused with an error naming the fix: ``use_liger_kernel=True``,
      ``importance_sampling_level="sequence"``, ``use_adaptive_entropy=True``.
    * Metrics: ``ess/mean``, ``ess/min``, ``ess/capped_frac``, ``ess/kl_behavior``,
      ``ess/ratio_mean``, ``ess/ratio_max``, ``ess/regularizer_loss``, plus TRL's ``policy_loss``,
      ``entropy`` and ``kl``; gathered across processes like TRL's clip ratios.

    Args:
        ess_scope: ``"batch"`` (default, the paper's batch ESS) or ``"sequence"``; passed to the core.
        use_sampling_logps: Use the rollout engine's log-probabilities as the behaviour policy
            when available (default ``True``).
        ess_check_values: Enable the core's host-syncing input checks (debugging only).
    """

    _tag_names: ClassVar[list[str]] = ["trl", "grpo", "ess-po"]

    def __init__(
        self,
        model: Any,
        reward_funcs: Any,
        args: GRPOConfig | None = None,
        *,
        ess_scope: str = "batch",
        use_sampling_logps: bool = True,
        ess_check_values: bool = False,
        **kwargs: Any,
    ) -> None:
        _validate_args(args)
        if ess_scope not in ("batch", "sequence"):
            raise ValueError(f"ess_scope must be 'batch' or 'sequence', got {ess_scope!r}")
        self.ess_scope = ess_scope
        self.use_sampling_logps = use_sampling_logps
        self.ess_check_values = ess_check_values
        super().__init__(model, reward_funcs, args=args, **kwargs)
        if self.use_vllm and self.vllm_importance_sampling_correction and use_sampling_logps:
            warnings.warn(
                "ESSGRPOTrainer uses vLLM's sampling log-probabilities as the behaviour policy; TRL's "
                "truncated importance-sampling ratio (vllm_importance_sampling_correction) is not applied "
                "on top. Set `vllm_importance_sampling_correction=False` to skip computing it.",
                UserWarning,
                stacklevel=2,
            )

    # -- helpers -----------------------------------------------------------------------------

    def _behaviour_logps(
        self, inputs: dict[str, Any], per_token_logps: torch.Tensor
    ) -> torch.Tensor:
        """logp_old: sampler log-probs if present, else TRL's old_per_token_logps, else on-policy."""
        old = inputs.get("old_per_token_logps")
        old = per_token_logps.detach() if old is None else old
        sampling = inputs.get("sampling_per_token_logps")
        if sampling is not None and self.use_sampling_logps:
            old = torch.where(torch.isnan(sampling), old, sampling)
        return old.to(per_token_logps.dtype)

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
    def _aggregate(
        per_token: torch.Tensor, mask: torch.Tensor, agg_mode: str, normalizer: torch.Tensor | float
    ) -> torch.Tensor:
        """Aggregate an extra per-token term (KL) exactly like the policy term."""
        if agg_mode == "seq-mean-token-mean":
            per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
            return per_seq.sum() / normalizer
        return (per_token * mask).sum() / normalizer

    # -- the hook ----------------------------------------------------------------------------

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        mode = "train" if self.model.training else "eval"
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = (
            completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        )
        mask = mask.to(torch.float32)

        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{key: inputs.get(key) for key in MODEL_INPUT_KEYS},
        )
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        logp_old = self._behaviour_logps(inputs, per_token_logps)

        # Token weights on the policy term, as TRL multiplies them into its per-token loss.
        weights: torch.Tensor | None = None
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(
                entropies, mask, 1 - self.top_entropy_quantile
            )
            weights = entropy_mask.to(mask.dtype)
        if self.off_policy_mask_threshold is not None:
            keep = self.get_off_policy_mask(
                advantages, per_token_logps, logp_old, mask, self.off_policy_mask_threshold
            )
            weights = keep if weights is None else weights * keep
        if (
            not self.use_sampling_logps
            and self.use_vllm
            and self.vllm_importance_sampling_correction
            and "importance_sampling_ratio" in inputs
        ):
            ratio = inputs["importance_sampling_ratio"]
            weights = ratio if weights is None else weights * ratio
        if weights is not None:
            weights = weights.expand_as(mask).to(per_token_logps.dtype)

        agg_mode, normalizer, log_scale = self._normalisation(inputs, mask, mode)
        out = ess_policy_loss(
            per_token_logps,
            logp_old,
            advantages,
            mask,
            loss_agg_mode=agg_mode,
            normalizer=normalizer,
            ess_scope=self.ess_scope,
            rollout_weights=weights,
            check_values=self.ess_check_values,
        )
        loss = out.loss

        # KL to the reference model: TRL's k3 estimator, optionally importance-corrected
        # (use_bias_correction_kl), added per token and normalised like the policy term.
        per_token_kl = None
        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"]
            per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
            if self.args.use_bias_correction_kl:
                per_token_kl = per_token_kl * torch.exp(per_token_logps - logp_old)
            loss = loss + self.beta * self._aggregate(per_token_kl, mask, agg_mode, normalizer)
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
