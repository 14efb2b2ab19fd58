"""``ESSGRPOTrainer``: TRL's ``GRPOTrainer`` with the ESS objective in its loss hook ``_compute_loss``."""

from __future__ import annotations

import inspect
import warnings
from typing import Any, ClassVar

import torch
from trl import GRPOTrainer
from trl.trainer.utils import nanmax, nanmin

from ess_po import ESSStats, ess_policy_loss, step_stats
from ess_po.aggregation import aggregate
from ess_po.integrations.trl.config import SUPPORTED_LOSS_TYPES, validate_args

__all__ = ["ESSGRPOTrainer"]

# inputs keys that TRL's `_compute_loss` forwards to `_get_per_token_logps_and_entropies`
# (multimodal / token-type fields)
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

# (metric name, field of the core's ESSLossOutput, cross-process reduction)
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


_GRPO_INIT_SIGNATURE = inspect.signature(GRPOTrainer.__init__)


class ESSGRPOTrainer(GRPOTrainer):
    """TRL ``GRPOTrainer`` whose policy objective is the ESS loss (:func:`ess_po.ess_policy_loss`).

    ``__init__`` takes exactly ``GRPOTrainer.__init__``'s parameters; ESS options live in
    :class:`ESSGRPOConfig` (a plain ``GRPOConfig`` gives their defaults). Only ``_compute_loss``
    is overridden. Per valid token, with ``d = logp - logp_old`` and ``w = exp(d)``::

        loss_t = -sg(min(w, ESS)) * A * logp + (1 - ESS) * (d + exp(-d) - 1)

    with ``ESS = (sum w)^2 / (n sum w^2)`` over the tokens of ``ess_scope`` (default ``"step"``:
    every micro-batch and rank of the optimizer step), aggregated with TRL's normalisation for
    ``loss_type`` (``dapo``, ``bnpo``, ``dr_grpo``, ``grpo``, ``luspo``). On-policy ESS = 1 and
    the gradient equals ``GRPOTrainer``'s.

    * ``logp_old`` is the rollout engine's ``sampling_per_token_logps`` when present (NaN tokens:
      TRL's ``old_per_token_logps``) and ``use_sampling_logps`` holds; TRL's importance-sampling
      ratio is then not applied. Otherwise ``old_per_token_logps`` and TRL's ratio, as TRL.
    * As TRL: ``off_policy_mask_threshold``, the k3 KL with ``beta`` and
      ``use_bias_correction_kl``, ``top_entropy_quantile``, a static ``entropy_coef``, the MoE
      auxiliary loss, truncation and tool masks.
    * Refused: ``loss_type`` ``cispo``/``sapo``/``vespo``, ``use_liger_kernel=True``,
      ``importance_sampling_level="sequence"``, ``use_adaptive_entropy=True``. ``epsilon``,
      ``epsilon_high`` and ``delta`` warn (no clipping range).
    * Metrics ``ess/mean``, ``ess/min``, ``ess/capped_frac``, ``ess/capped_mass``,
      ``ess/kl_behavior``, ``ess/ratio_mean``, ``ess/ratio_max``, ``ess/ratio_min``,
      ``ess/regularizer_loss`` plus TRL's ``policy_loss``, ``entropy``, ``kl``; gathered across
      processes (mean; ``ess/min``, ``ess/ratio_min``: min; ``ess/ratio_max``: max).
    """

    _tag_names: ClassVar[list[str]] = ["trl", "grpo", "ess-po"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Same parameters as GRPOTrainer: bind to its signature (TypeError as GRPOTrainer would
        # raise it), check the config before TRL builds anything, then let TRL do the rest.
        bound = _GRPO_INIT_SIGNATURE.bind(self, *args, **kwargs)
        scope = validate_args(bound.arguments.get("args"))
        super().__init__(*args, **kwargs)
        self.ess_scope: str = scope  # "step", "call" or "sequence" (after the step fallback)
        self.use_sampling_logps: bool = getattr(self.args, "use_sampling_logps", True)
        self.ess_check_values: bool = getattr(self.args, "ess_check_values", False)
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
        """ESS statistics of the optimizer step that starts now (``ess_scope="step"``).

        The step's micro-batches are TRL's ``_buffered_inputs[(_step + j) % steps_per_generation]``
        for ``j < gradient_accumulation_steps``, all generated already (``steps_per_generation``
        is a multiple of the accumulation steps). Each contributes ``log pi_theta - logp_old`` of
        its valid tokens, ``(B, T)``: on the first optimizer step after a generation from the
        log-probs in hand (``old - logp_old``; zero without them and without sampler log-probs),
        otherwise from one no-grad forward. Merged over micro-batches and all-reduced over ranks
        by :func:`ess_po.step_stats`; every rank calls this at the same micro-batch.
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

        scope, stats = self.ess_scope, None
        if scope == "step":
            if mode == "train":
                if self._step % self.current_gradient_accumulation_steps == 0:  # step's first call
                    self._ess_step_stats = self._step_ess_stats()
                stats = self._ess_step_stats
            else:  # evaluation has no optimizer step
                scope = "call"

        agg_mode, normalizer, log_scale = self._normalisation(inputs, mask, mode)
        out = ess_policy_loss(
            per_token_logps,
            logp_old,  # may be float32 beside bf16 logp_new (vLLM); the core computes in float32
            advantages,
            mask,
            loss_agg_mode=agg_mode,
            normalizer=normalizer,
            ess_scope=scope,
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

        self._log_ess_metrics(mode, out, policy_loss, entropies, per_token_kl, aux_loss, mask)
        return loss

    @torch.no_grad()
    def _log_ess_metrics(
        self,
        mode: str,
        out: Any,
        policy_loss: torch.Tensor,
        entropies: torch.Tensor,
        per_token_kl: torch.Tensor | None,
        aux_loss: torch.Tensor | None,
        mask: torch.Tensor,
    ) -> None:
        """One gather and one host transfer for all metrics (TRL gathers its clip ratios the same way)."""
        kl_sum = (per_token_kl * mask).sum() if per_token_kl is not None else mask.new_zeros(())
        aux = aux_loss.detach().float() if aux_loss is not None else mask.new_zeros(())
        local = [getattr(out, key).detach().float() for _, key, _ in _ESS_METRICS]
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
