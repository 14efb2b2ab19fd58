"""verl shim: registers the ESS policy loss under ``policy_loss.loss_mode=ess``.

Importing this module registers three entries in verl's policy-loss registry
(``verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY``):

* ``ess``      -- :func:`ess_po.ess_policy_loss` with ``ess_scope="batch"``: one ESS per loss call
  (micro-batch), all-reduced over data-parallel ranks, as in the authors' reference code;
* ``ess_seq``  -- the same loss with ``ess_scope="sequence"`` (one ESS per sequence);
* ``ess_step`` -- one ESS per optimizer step (mini-batch), from statistics that the opt-in
  worker of :func:`enable_step_scope` computes before the step's first backward: free (no
  forward) where the step's policy is the one that produced ``old_log_prob``, else a no-grad
  pre-pass.

verl imports this module by itself: ``pyproject.toml`` declares it in the ``verl.plugins``
entry-point group, which ``import verl`` loads (unless ``VERL_USE_EXTERNAL_PLUGINS=none``).
The fallback is ``VERL_USE_EXTERNAL_MODULES=ess_po.integrations.verl``.

Loss (per verl call = one micro-batch on one rank; shapes ``(B, T)``)::

    d    = log_prob - old_log_prob,      w = exp(d),      c = rollout_is_weights (or 1)
    ℓ_bt = -sg(min(w_bt, ESS)) * A_bt * c_bt * log_prob_bt + (1 - ESS) * (d_bt + exp(-d_bt) - 1)
    loss = scale * core_agg(ℓ, response_mask; mode, normalizer)

The per-token loss and its aggregation are computed by the core (:func:`ess_po.ess_policy_loss`);
this module only translates verl's ``loss_agg_mode`` and ``config.global_batch_info`` into the
core's ``loss_agg_mode`` / ``normalizer`` plus a scalar ``scale``, reproducing
``verl.trainer.ppo.core_algos.agg_loss``::

    verl loss_agg_mode        core loss_agg_mode     core normalizer                     scale
    -----------------------   -------------------    --------------------------------    ------------
    token-mean                token-mean             batch_num_tokens   (None: local)    dp_size
    token-sum                 token-sum              --                                  dp_size
    seq-mean-token-sum        seq-mean-token-sum     global_batch_size  (None: local)    dp_size
    seq-mean-token-sum-norm   seq-mean-token-sum     global_batch_size  (None: local)    dp_size / H
    seq-mean-token-mean       seq-mean-token-mean    global_batch_size  (None: local)    dp_size

with ``H = loss_scale_factor`` or, when that is None, ``T = response_mask.shape[-1]``. "local" is
the core's default (valid tokens / non-empty sequences of this call), exactly verl's fallback.
verl's data-parallel all-reduce *averages* gradients, hence the ``dp_size`` factor; with the
global normaliser the micro-batch gradients then *sum* to the gradient of the full mini-batch.

With ``ess`` and ``ess_seq`` the ESS is a per-call statistic, all-reduced over the ranks that
hold different tokens (see :func:`set_process_group`), so it depends on the micro-batch size;
``ess_step`` shares one ESS across every micro-batch and rank of the optimizer step.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any, Final

import torch

from ess_po import ESSStats, ess_policy_loss, step_stats

from .parallel import ess_process_group

__all__ = [
    "LOSS_NAME",
    "SEQUENCE_LOSS_NAME",
    "STEP_LOSS_NAME",
    "VERL_LOSS_AGG_MODES",
    "compute_policy_loss_ess",
    "compute_policy_loss_ess_seq",
    "compute_policy_loss_ess_step",
    "enable_step_scope",
    "register",
    "set_process_group",
    "verl_aggregation",
]

LOSS_NAME: Final = "ess"
"""``policy_loss.loss_mode`` of :func:`compute_policy_loss_ess` (one ESS per batch)."""
SEQUENCE_LOSS_NAME: Final = "ess_seq"
"""``policy_loss.loss_mode`` of :func:`compute_policy_loss_ess_seq` (one ESS per sequence)."""
STEP_LOSS_NAME: Final = "ess_step"
"""``policy_loss.loss_mode`` of :func:`compute_policy_loss_ess_step` (one ESS per optimizer step)."""
STEP_SCOPE_ENV: Final = "ESS_PO_VERL_STEP_SCOPE"
"""Environment variable: ``1`` makes the plugin call :func:`enable_step_scope` when verl loads it."""

#: verl ``loss_agg_mode`` -> core ``loss_agg_mode``.
_CORE_MODE: Final[dict[str, str]] = {
    "token-mean": "token-mean",
    "token-sum": "token-sum",
    "seq-mean-token-sum": "seq-mean-token-sum",
    "seq-mean-token-sum-norm": "seq-mean-token-sum",
    "seq-mean-token-mean": "seq-mean-token-mean",
}
VERL_LOSS_AGG_MODES: Final = tuple(_CORE_MODE)
"""The verl ``actor.loss_agg_mode`` values the shim supports (all of verl 0.9's)."""

_GLOBAL_BATCH_KEYS: Final = (
    "dp_size",
    "batch_num_tokens",
    "global_batch_size",
    "loss_scale_factor",
)

Normalizer = int | float | torch.Tensor | None

_process_group: Any = None


def set_process_group(group: Any) -> None:
    """Set the ``torch.distributed`` group over which ESS is all-reduced (``None``: automatic).

    Automatic (:func:`ess_po.integrations.parallel.ess_process_group`) means: Megatron's
    data-parallel group with context parallelism when ``megatron.core.parallel_state`` is
    initialised (only the last pipeline stage computes the loss, so the world group would hang),
    otherwise the default (world) group. See docs/verl.md, "Parallel layouts".
    """
    global _process_group
    _process_group = group


def _ess_process_group() -> Any:
    return ess_process_group(_process_group)


def _global_batch_info(config: Any) -> Mapping[str, Any]:
    """``config.global_batch_info`` for ActorConfig / DictConfig / dict configs; ``{}`` if absent."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        info = config.get("global_batch_info", None)
    else:
        info = getattr(config, "global_batch_info", None)
    if info is None:
        return {}
    if not isinstance(info, Mapping):
        raise ValueError(
            f"config.global_batch_info must be a mapping with keys {_GLOBAL_BATCH_KEYS}, "
            f"got {type(info).__name__}; pass verl's ActorConfig (or a dict) as `config`."
        )
    return info


def verl_aggregation(
    loss_agg_mode: str,
    response_mask: torch.Tensor,
    global_batch_info: Mapping[str, Any] | None = None,
) -> tuple[str, Normalizer, float]:
    """Translate verl's aggregation into ``(core_loss_agg_mode, normalizer, scale)``.

    ``response_mask`` is the ``(B, T)`` mask of the micro-batch (only its width ``T`` is used, as
    the horizon of ``seq-mean-token-sum-norm`` when ``loss_scale_factor`` is None).
    ``global_batch_info`` holds verl's ``dp_size`` (default 1), ``batch_num_tokens`` (valid tokens
    in the mini-batch over all ranks), ``global_batch_size`` (sequences in the mini-batch over all
    ranks) and ``loss_scale_factor``; missing / None entries fall back to local counts, which
    verl only allows for ``dp_size == 1``. The shim's loss is ``scale * core_loss``.
    """
    if loss_agg_mode not in _CORE_MODE:
        raise ValueError(
            f"Unsupported loss_agg_mode {loss_agg_mode!r}; set actor_rollout_ref.actor.loss_agg_mode "
            f"to one of {VERL_LOSS_AGG_MODES}."
        )
    info = global_batch_info or {}
    dp_size = info.get("dp_size", None)
    dp_size = 1 if dp_size is None else int(dp_size)
    if dp_size < 1:
        raise ValueError(f"global_batch_info['dp_size'] must be >= 1, got {dp_size}.")

    normalizer: Normalizer = None
    scale = float(dp_size)
    if loss_agg_mode == "token-mean":
        normalizer = info.get("batch_num_tokens", None)
        if normalizer is None and dp_size > 1:
            raise ValueError(
                "token-mean with dp_size > 1 needs global_batch_info['batch_num_tokens'] (valid "
                "tokens of the mini-batch over all ranks); verl's actor sets it, direct callers must too."
            )
    elif loss_agg_mode != "token-sum":
        normalizer = info.get("global_batch_size", None)
        if normalizer is None and dp_size > 1:
            raise ValueError(
                f"{loss_agg_mode} with dp_size > 1 needs global_batch_info['global_batch_size'] "
                "(sequences of the mini-batch over all ranks); verl's actor sets it, direct callers must too."
            )
        if loss_agg_mode == "seq-mean-token-sum-norm":
            horizon = info.get("loss_scale_factor", None)
            if horizon is None:
                horizon = response_mask.shape[-1]
            if float(horizon) <= 0:
                raise ValueError(
                    f"loss_scale_factor must be positive, got {horizon}; set "
                    "actor_rollout_ref.actor.loss_scale_factor to the max response length or null."
                )
            scale /= float(horizon)
    return _CORE_MODE[loss_agg_mode], normalizer, scale


# The loss parts are inside verl's own actor/pg_loss; a token count is no diagnostic.
_NOT_LOGGED: Final = ("policy_loss", "regularizer_loss", "num_tokens")


def _verl_metrics(metrics: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Core diagnostics under verl's ``actor/`` prefix (``actor/ess``, ``actor/ess_capped_frac``, ...).

    Values stay detached 0-dim tensors: verl 0.9 wraps them in ``verl.utils.metric.Metric``, which
    accepts scalar tensors (it calls ``.item()`` itself), so the loss path adds no host sync.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in metrics.items():
        if key not in _NOT_LOGGED:
            name = key if key.startswith("ess") else f"ess_{key}"
            out[f"actor/{name}"] = value
    return out


def _ess_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str,
    config: Any,
    rollout_is_weights: torch.Tensor | None,
    ess_scope: str,
    stats: ESSStats | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    core_mode, normalizer, scale = verl_aggregation(
        loss_agg_mode, response_mask, _global_batch_info(config)
    )
    out = ess_policy_loss(
        log_prob,
        old_log_prob.detach(),
        advantages,
        response_mask,
        loss_agg_mode=core_mode,
        normalizer=normalizer,
        ess_scope=ess_scope,
        rollout_weights=None if rollout_is_weights is None else rollout_is_weights.detach(),
        process_group=_ess_process_group(),
        stats=stats,
    )
    loss = out.loss if scale == 1.0 else out.loss * scale
    return loss, _verl_metrics(out.metrics())


def compute_policy_loss_ess(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """ESS policy loss with verl's policy-loss signature (registered as ``ess``).

    Args:
        old_log_prob: ``(B, T)`` behaviour log-probs (detached).
        log_prob: ``(B, T)`` current-policy log-probs of the sampled tokens (requires grad).
        advantages: ``(B, T)`` advantages (``(B,)`` / ``(B, 1)`` also accepted by the core).
        response_mask: ``(B, T)`` bool / 0-1 mask of valid response tokens.
        loss_agg_mode: one of :data:`VERL_LOSS_AGG_MODES` (see module docstring for the mapping).
        config: verl's ``ActorConfig`` (or ``DictConfig`` / dict); only ``global_batch_info`` is
            read. ``None`` means local normalisation with ``dp_size = 1``.
        rollout_is_weights: ``(B, T)`` rollout-correction weights multiplying the policy term.

    Returns:
        ``(loss, metrics)``: scalar loss differentiable w.r.t. ``log_prob`` and a dict of detached
        0-dim tensors ``actor/ess``, ``actor/ess_min``, ``actor/ess_capped_frac``,
        ``actor/ess_capped_mass``, ``actor/ess_kl_behavior``, ``actor/ess_ratio_mean``,
        ``actor/ess_ratio_max``, ``actor/ess_ratio_min``.
    """
    return _ess_loss(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
        "batch",
    )


def compute_policy_loss_ess_seq(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """As :func:`compute_policy_loss_ess` with one ESS per sequence (registered as ``ess_seq``).

    Per-sequence ESS does not depend on how verl splits the mini-batch, so the summed micro-batch
    gradients equal the full mini-batch gradient exactly.
    """
    return _ess_loss(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
        "sequence",
    )


# ----------------------------------------------------------------------------- step scope

#: ESS statistics of the optimizer step being trained, set by the worker installed by
#: :func:`enable_step_scope` for the duration of one ``engine.train_batch`` call.
_step_stats: ESSStats | None = None
#: Whether ``_step_stats`` came from the free path (no forward) instead of the pre-pass.
_step_free: bool = False
#: ``enable_step_scope(free_path=...)``: False runs the pre-pass before every optimizer step.
_free_path_allowed: bool = True


def compute_policy_loss_ess_step(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """As :func:`compute_policy_loss_ess` with one ESS per optimizer step (``ess_step``).

    The ESS comes from the statistics of the whole mini-batch (every micro-batch, every
    data-parallel rank) that the worker of :func:`enable_step_scope` computes before the step's
    first backward; every micro-batch's loss of that step uses them, so the update does not
    depend on ``ppo_micro_batch_size_per_gpu``. Opt-in. Where the step's parameters are those
    that produced ``old_log_prob`` (verl's recompute, first mini-batch of an update) the
    statistics are those of ``d = 0`` on the valid tokens (ESS = 1) and cost no forward;
    otherwise one no-grad forward per micro-batch. Extra metric ``actor/ess_step_free``: 1 for
    the free statistics, 0 for the pre-pass (verl averages it over the update's calls).

    Raises:
        ValueError: no step statistics are set (the step-scope worker is not installed).
    """
    if _step_stats is None:
        raise ValueError(
            f"policy_loss.loss_mode={STEP_LOSS_NAME} needs the ESS statistics of the optimizer "
            "step, which a no-grad pre-pass computes; none were set. Set "
            f"{STEP_SCOPE_ENV}=1 in the environment of verl's workers (for Ray: "
            f"+ray_kwargs.ray_init.runtime_env.env_vars.{STEP_SCOPE_ENV}=1) or call "
            "ess_po.integrations.verl.enable_step_scope() in each worker, or use loss_mode=ess."
        )
    loss, metrics = _ess_loss(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
        "batch",
        stats=_step_stats,
    )
    metrics["actor/ess_step_free"] = torch.tensor(float(_step_free), device=loss.device)
    return loss, metrics


def _loss_mode(loss_function: Any) -> str | None:
    """``policy_loss.loss_mode`` of verl's ``partial(ppo_loss, config=actor_config)``."""
    config = getattr(loss_function, "keywords", {}).get("config")
    policy_loss = getattr(config, "policy_loss", None)
    if policy_loss is None:
        return None
    return (
        policy_loss.get("loss_mode", None)
        if isinstance(policy_loss, Mapping)
        else getattr(policy_loss, "loss_mode", None)
    )


def _padded(tensor: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` view of a verl field: jagged nested tensors padded with 0."""
    return torch.nested.to_padded_tensor(tensor, 0) if tensor.is_nested else tensor


def _step_prepass(engine: Any, data: Any) -> ESSStats:
    """ESS statistics of one mini-batch: a no-grad forward through verl's own micro-batch loop
    (``forward_backward_batch(..., forward_only=True)``, the path of ``compute_log_prob``) in the
    engine's current (train) mode, then ``step_stats`` over ``log_prob - old_log_prob`` on the
    valid response tokens, all-reduced over the ESS process group."""
    from verl.workers.utils.padding import no_padding_2_padding

    probe = data.copy()  # verl writes bookkeeping keys into the TensorDict it is given
    with torch.no_grad():
        output = engine.forward_backward_batch(probe, None, forward_only=True)
    log_prob = no_padding_2_padding(output["model_output"]["log_probs"], probe)
    padded = probe.select("response_mask", "old_log_probs").to_padded_tensor()
    mask = padded["response_mask"].to(torch.bool)
    width = log_prob.shape[-1]
    log_ratio = log_prob.float() - padded["old_log_probs"][:, :width].float()
    return _rank_step_stats(log_ratio, mask[:, :width])


def _free_step_stats(data: Any) -> ESSStats:
    """The free path: the statistics of ``d = 0`` on this rank's valid response tokens (the
    step's policy produced ``old_log_prob``), all-reduced like the pre-pass's; no forward."""
    from verl.utils.device import get_device_id

    mask = _padded(data["response_mask"]).to(device=get_device_id(), dtype=torch.bool)
    return _rank_step_stats(torch.zeros(mask.shape, device=mask.device), mask)


def _rank_step_stats(log_ratio: torch.Tensor, mask: torch.Tensor) -> ESSStats:
    """Statistics of this rank's ``(B, T)`` share of the optimizer step, all-reduced over the ESS
    process group: every rank of the step gets the same ESS (tests/test_verl_step.py, 2 ranks)."""
    return step_stats([(log_ratio, mask)], process_group=_ess_process_group())


def _param_fingerprint(engine: Any) -> tuple[tuple[int, int], ...] | None:
    """``(id, _version)`` of every parameter of the engine's module(s); None when there are none.

    PyTorch bumps a tensor's ``_version`` on every in-place write through it (an optimizer step,
    ``load_state_dict``'s ``copy_``); a replaced parameter has a new ``id``."""
    module = getattr(engine, "module", None)
    modules = module if isinstance(module, (list, tuple)) else [module]
    if not all(isinstance(m, torch.nn.Module) for m in modules):
        return None
    fingerprint = tuple((id(p), p._version) for m in modules for p in m.parameters())
    return fingerprint or None


def _field_bytes(tensor: torch.Tensor) -> bytes:
    data = tensor.detach().cpu().contiguous()
    return (
        len(data.shape).to_bytes(1, "little")
        + repr(tuple(data.shape)).encode()
        + data.numpy().tobytes()
    )


def _sequence_digests(data: Any, log_probs: torch.Tensor) -> list[bytes] | None:
    """One digest per sequence of ``data``: its token ids, position ids, temperature, the
    positions of its valid response tokens and ``log_probs`` (float32, aligned with
    ``response_mask``) on them. None when ``data`` holds model inputs the digest does not cover
    (multi-modal inputs), so that such batches never take the free path."""
    from verl.utils import tensordict_utils as tu

    if "multi_modal_inputs" in data:
        return None
    input_ids, position_ids = data["input_ids"], data["position_ids"]
    mask = _padded(data["response_mask"]).bool().cpu()
    values = _padded(log_probs).detach().float().cpu()
    rows = mask.shape[0]
    temperature = tu.get(data, "temperature", default=None)
    if isinstance(temperature, torch.Tensor) and temperature.numel() == rows:
        temperatures = temperature.reshape(rows).double().tolist()
    elif isinstance(temperature, (list, tuple)) and len(temperature) == rows:
        temperatures = [float(t) for t in temperature]
    elif temperature is None or isinstance(temperature, (int, float)):
        temperatures = [temperature] * rows
    else:
        return None
    ids, positions = input_ids.unbind(0), position_ids.unbind(0)
    if len(ids) != rows or len(positions) != rows or values.shape[0] != rows:
        return None
    digests = []
    for i in range(rows):
        valid = mask[i].nonzero().flatten()
        if valid.numel() and int(valid[-1]) >= values.shape[1]:
            return None
        h = hashlib.blake2b(digest_size=16)
        for part in (ids[i].long(), positions[i].long(), valid, values[i][valid]):
            h.update(_field_bytes(part))
        h.update(repr(temperatures[i]).encode())
        digests.append(h.digest())
    return digests


class _OnPolicyRecord:
    """Which log-probs this worker's ``compute_log_prob`` produced at the current parameters.

    The parameter *state* is ``(updates, fingerprint)``: ``updates`` counts the engine calls that
    can change the parameters (``optimizer_step``, ``train_batch``, ``load_checkpoint``,
    ``initialize``; the worker wraps them) and ``fingerprint`` is :func:`_param_fingerprint`.
    :meth:`record` keeps the :func:`_sequence_digests` of a ``compute_log_prob`` output with the
    state it ran at (a forward that changed the state is not recorded); :meth:`covers` holds
    when the state is unchanged and every sequence of a mini-batch carries, as
    ``old_log_probs``, bit for bit the log-probs recorded for it. Then ``old_log_probs`` are
    the current policy's log-probs and ``d = log_prob - old_log_prob`` is 0 on every valid
    token. Bypass mode (rollout log-probs as ``old_log_probs``), edited ``old_log_probs``, a
    mini-batch after an optimizer step or a LoRA reference forward never match."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.updates = 0
        self.state: tuple | None = None
        self.digests: set[bytes] = set()

    def current_state(self) -> tuple | None:
        fingerprint = _param_fingerprint(self.engine)
        return None if fingerprint is None else (self.updates, fingerprint)

    def touch(self) -> None:
        """The parameters may have changed: forget every record."""
        self.updates += 1
        self.state, self.digests = None, set()

    def record(self, data: Any, output: Any, state: tuple | None) -> None:
        from verl.workers.utils.padding import no_padding_2_padding

        if state is None or state != self.current_state():
            return
        # The trainer's own conversion of compute_log_prob's output into old_log_probs
        # (RayPPOTrainer._compute_old_log_prob); a trainer that converts differently stores
        # other bits and falls back to the pre-pass.
        try:
            digests = _sequence_digests(data, no_padding_2_padding(output["log_probs"], data))
        except Exception:  # a layout this record does not know: no record, hence the pre-pass
            return
        if digests is None:
            return
        if state != self.state:
            self.state, self.digests = state, set()
        self.digests.update(digests)

    def covers(self, data: Any) -> bool:
        state = self.current_state()
        if state is None or state != self.state:
            return False
        try:
            digests = _sequence_digests(data, data["old_log_probs"])
        except Exception:  # a layout this record does not know: the pre-pass
            return False
        return digests is not None and set(digests) <= self.digests


def _all_ranks_agree(flag: bool) -> bool:
    """``flag`` on every rank of the default process group (a MIN all-reduce), so that all ranks
    take the same branch (the pre-pass forward and the statistics all-reduce are collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    from verl.utils.device import get_device_id

    vote = torch.tensor([int(flag)], dtype=torch.int32, device=get_device_id())
    dist.all_reduce(vote, op=dist.ReduceOp.MIN)
    return bool(vote.item())


def enable_step_scope(free_path: bool = True) -> None:
    """Install the step-scope worker in verl's actor (idempotent, opt-in).

    Sets ``verl.workers.engine_workers.ActorRolloutRefWorker.actor_worker_cls`` to a
    ``TrainingWorker`` subclass that computes the step statistics before each optimizer step
    when ``policy_loss.loss_mode`` is ``ess_step`` (other loss modes are untouched):

    * free path (``free_path=True``, the default): when every data-parallel rank's mini-batch
      holds, as ``old_log_probs``, exactly the log-probs this worker's ``compute_log_prob``
      produced at the current parameters (``_OnPolicyRecord``; in verl's default mode, the
      first mini-batch of each update), the statistics of ``d = 0`` on the valid tokens, no
      forward;
    * otherwise (bypass mode, later mini-batches, ``free_path=False``): a no-grad pre-pass
      forward over the mini-batch (one per micro-batch).

    Must run in every worker process before the actor is built; the plugin does it when the
    environment variable ``ESS_PO_VERL_STEP_SCOPE`` is ``1``. A later call only changes
    ``free_path``. Tested with verl 0.9.1's FSDP2 engine.
    """
    global _free_path_allowed
    from verl.workers import engine_workers

    _free_path_allowed = bool(free_path)
    if getattr(engine_workers.ActorRolloutRefWorker.actor_worker_cls, "_ess_step_scope", False):
        return

    class ESSStepTrainingWorker(engine_workers.TrainingWorker):
        _ess_step_scope = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            engine = self.engine
            record = self._ess_on_policy = _OnPolicyRecord(engine)

            def touching(method: Any) -> Any:
                def call(*args: Any, **kwargs: Any) -> Any:
                    try:
                        return method(*args, **kwargs)
                    finally:
                        record.touch()

                return call

            for name in ("optimizer_step", "load_checkpoint", "initialize"):
                setattr(engine, name, touching(getattr(engine, name)))
            train_batch, infer_batch = engine.train_batch, self.infer_batch

            def infer_batch_recorded(data: Any) -> Any:
                from verl.utils import tensordict_utils as tu

                # A forward with the LoRA adapter disabled is the reference policy's.
                reference = bool(tu.get(data, "no_lora_adapter", default=False))
                state = record.current_state()
                output = infer_batch(data)
                if output is not None and not reference and "log_probs" in output:
                    record.record(data, output, state)
                return output

            def train_batch_with_step_stats(data: Any, loss_function: Any) -> Any:
                global _step_stats, _step_free
                if _loss_mode(loss_function) != STEP_LOSS_NAME:
                    try:
                        return train_batch(data, loss_function)
                    finally:
                        record.touch()
                free = _all_ranks_agree(_free_path_allowed and record.covers(data))
                _step_stats = _free_step_stats(data) if free else _step_prepass(engine, data)
                _step_free = free
                try:
                    return train_batch(data, loss_function)
                finally:
                    _step_stats, _step_free = None, False
                    record.touch()

            self.infer_batch = infer_batch_recorded
            engine.train_batch = train_batch_with_step_stats

    engine_workers.ActorRolloutRefWorker.actor_worker_cls = ESSStepTrainingWorker


def register() -> None:
    """Register ``ess``, ``ess_seq`` and ``ess_step`` with verl's ``register_policy_loss``
    (idempotent)."""
    try:
        from verl.trainer.ppo.core_algos import register_policy_loss
    except ImportError as exc:  # pragma: no cover - exercised only without verl
        raise ImportError(
            'ess_po.integrations.verl needs verl 0.9: pip install -e ".[verl]" in a checkout '
            'of ess-po (pip install "ess-po[verl]" once released).'
        ) from exc
    register_policy_loss(LOSS_NAME)(compute_policy_loss_ess)
    register_policy_loss(SEQUENCE_LOSS_NAME)(compute_policy_loss_ess_seq)
    register_policy_loss(STEP_LOSS_NAME)(compute_policy_loss_ess_step)


def _trl_conflict() -> str | None:
    """Why verl's FSDP actor cannot start next to the installed ``trl``, or None.

    verl 0.9's FSDP engine calls ``verl.models.transformers.monkey_patch.apply_monkey_patch``
    when it builds the model; whenever ``trl`` is importable, that function imports
    ``AutoModelForCausalLMWithValueHead`` from ``trl.experimental.ppo``, else from ``trl``. TRL
    releases without that class (1.16, the version the ``trl`` extra pins) make the actor fail
    with ``ImportError``. This reproduces verl's two imports (importing ``trl`` costs ~1 s, only
    where it is installed).
    """
    import importlib
    import importlib.util
    import warnings

    try:
        if importlib.util.find_spec("trl") is None:
            return None
    except (ImportError, ValueError):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental warns on import
        for module in ("trl.experimental.ppo", "trl"):
            try:
                if hasattr(importlib.import_module(module), "AutoModelForCausalLMWithValueHead"):
                    return None
            except ImportError:
                continue
    from importlib.metadata import PackageNotFoundError, version

    try:
        trl_version = version("trl")
    except PackageNotFoundError:
        trl_version = "?"
    return (
        f"ess-po: trl {trl_version} is installed next to verl, and verl's FSDP actor will fail "
        "with ImportError when it builds the model: verl's apply_monkey_patch imports "
        "AutoModelForCausalLMWithValueHead from trl whenever trl is importable, and this trl "
        "has no such class. Run verl in an environment without trl (`pip uninstall trl`; the "
        "verl extra of ess-po does not need it) and TRL training in a separate environment."
    )


def _warn_on_trl_conflict() -> None:
    import warnings

    message = _trl_conflict()
    if message is not None:
        warnings.warn(message, RuntimeWarning, stacklevel=2)


register()
_warn_on_trl_conflict()
if os.environ.get(STEP_SCOPE_ENV, "") == "1":
    enable_step_scope()
