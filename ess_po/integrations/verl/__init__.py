"""verl plugin: registers the ESS policy loss under ``policy_loss.loss_mode=ess``.

Importing this package registers three entries in verl's policy-loss registry
(``verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY``), one per ``ess_scope`` of the core:

=============  ==============  =====================================================
``loss_mode``  ``ess_scope``   one ESS over
=============  ==============  =====================================================
``ess``        ``"call"``      the valid tokens of one loss call (micro-batch), all
                               data-parallel ranks
``ess_seq``    ``"sequence"``  each sequence
``ess_step``   ``"step"``      the whole optimizer step (mini-batch), all ranks; needs
                               :func:`enable_step_scope`
=============  ==============  =====================================================

Each loss is the core's per-token objective (:func:`ess_po.ess_token_loss`) reduced by verl's own
``agg_loss`` with ``config.global_batch_info``, as verl's built-in losses are.

verl imports this package by itself: ``pyproject.toml`` declares it in the ``verl.plugins``
entry-point group, which ``import verl`` loads (unless ``VERL_USE_EXTERNAL_PLUGINS=none``).
The fallback is ``VERL_USE_EXTERNAL_MODULES=ess_po.integrations.verl``.
"""

from __future__ import annotations

import os
from typing import Any, Final

from .losses import VERL_LOSS_AGG_MODES, make_policy_loss
from .step_scope import STEP_LOSS_NAME, STEP_SCOPE_ENV, StepScope

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
]

LOSS_NAME: Final = "ess"
"""``policy_loss.loss_mode`` of :data:`compute_policy_loss_ess` (one ESS per loss call)."""
SEQUENCE_LOSS_NAME: Final = "ess_seq"
"""``policy_loss.loss_mode`` of :data:`compute_policy_loss_ess_seq` (one ESS per sequence)."""

#: The process group and the statistics of the step being trained, for every loss below.
_SCOPE: Final = StepScope()

compute_policy_loss_ess = make_policy_loss("call", _SCOPE, "compute_policy_loss_ess")
"""ESS policy loss with verl's policy-loss signature (``loss_mode=ess``): one ESS per call.

Args:
    old_log_prob (torch.Tensor): ``(B, T)`` behaviour log-probs.
    log_prob (torch.Tensor): ``(B, T)`` current-policy log-probs of the sampled tokens
        (requires grad).
    advantages (torch.Tensor): ``(B, T)`` advantages (``(B,)`` / ``(B, 1)`` also accepted by
        the core).
    response_mask (torch.Tensor): ``(B, T)`` bool / 0-1 mask of valid response tokens.
    loss_agg_mode (str): one of :data:`VERL_LOSS_AGG_MODES`, passed to verl's ``agg_loss``.
    config (Any): verl's ``ActorConfig`` (or ``DictConfig`` / dict); only
        ``global_batch_info`` is read. ``None``: local normalisation with ``dp_size = 1``.
    rollout_is_weights (torch.Tensor | None): ``(B, T)`` rollout-correction weights
        multiplying the policy term.

Returns:
    (tuple[torch.Tensor, dict[str, torch.Tensor]]): ``(loss, metrics)``: the scalar
    ``agg_loss`` of the ``(B, T)`` per-token ESS loss (0, with gradient 0, for a micro-batch
    without valid tokens) and detached 0-dim tensors ``actor/ess``, ``actor/ess_min``,
    ``actor/ess_capped_frac``, ``actor/ess_capped_mass``, ``actor/ess_kl_behavior``,
    ``actor/ess_ratio_mean``, ``actor/ess_ratio_max``, ``actor/ess_ratio_min``.
"""

compute_policy_loss_ess_seq = make_policy_loss("sequence", _SCOPE, "compute_policy_loss_ess_seq")
"""As :data:`compute_policy_loss_ess` with one ESS per sequence (``loss_mode=ess_seq``).

The ESS of a sequence does not depend on how verl splits the mini-batch, so the summed
micro-batch gradients equal the full mini-batch gradient exactly.
"""

compute_policy_loss_ess_step = make_policy_loss("step", _SCOPE, "compute_policy_loss_ess_step")
"""As :data:`compute_policy_loss_ess` with one ESS per optimizer step (``loss_mode=ess_step``).

The ESS comes from the statistics of the whole mini-batch (every micro-batch, every
data-parallel rank) that the worker of :func:`enable_step_scope` computes before the step's
first backward, so the update does not depend on ``ppo_micro_batch_size_per_gpu``. Extra metric
``actor/ess_step_free``: 1 when the statistics came from the free path (no forward), 0 from the
pre-pass.

Raises:
    ValueError: no step statistics are set (the step-scope worker is not installed).
"""


def set_process_group(group: Any) -> None:
    """Set the ``torch.distributed`` group over which ESS is all-reduced (``None``: automatic).

    Automatic (:func:`ess_po.integrations.parallel.ess_process_group`): Megatron's data-parallel
    group with context parallelism when ``megatron.core.parallel_state`` is initialised (only
    the last pipeline stage computes the loss), otherwise the default (world) group.
    """
    _SCOPE.group = group


def enable_step_scope(free_path: bool = True) -> None:
    """Install the step-scope worker in verl's actor (idempotent, opt-in).

    Sets ``verl.workers.engine_workers.ActorRolloutRefWorker.actor_worker_cls`` to a
    ``TrainingWorker`` subclass that computes the step statistics before each optimizer step
    when ``policy_loss.loss_mode`` is ``ess_step`` (other loss modes are untouched):

    * free path (``free_path=True``): when every data-parallel rank's mini-batch holds, as
      ``old_log_probs``, exactly the log-probs this worker's ``compute_log_prob`` produced at
      the current parameters (in verl's default mode, the first mini-batch of each update), the
      statistics of ``d = 0`` on the valid tokens, with no forward;
    * otherwise: a no-grad pre-pass forward over the mini-batch (one per micro-batch).

    Must run in every worker process before the actor is built; the plugin does it when the
    environment variable ``ESS_PO_VERL_STEP_SCOPE`` is ``1``. A later call only changes
    ``free_path``. The worker warns, before verl builds the model, if the installed ``trl``
    would make verl's FSDP actor fail. Tested with verl 0.9.1's FSDP2 engine.
    """
    _SCOPE.install(free_path)


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


register()
if os.environ.get(STEP_SCOPE_ENV, "") == "1":
    enable_step_scope()
