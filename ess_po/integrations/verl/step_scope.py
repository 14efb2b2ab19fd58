"""One ESS per optimizer step in verl: the statistics of the whole mini-batch before its first
backward, held by one :class:`StepScope` object for the loss calls of that step.

For a mini-batch of ``(B, T)`` micro-batches on all data-parallel ranks, with
``d = log_prob - old_log_prob`` on the valid response tokens, the step statistics are
``ess_po.step_stats`` over every rank's share, all-reduced over the ESS process group; every loss
call of the step then uses ``ESS = (Σw)² / (n Σw²)`` of the whole step. ``log_prob`` comes from a
no-grad pre-pass through verl's own micro-batch loop, or, on the free path
(:mod:`.free_path`), ``d = 0`` without a forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Final

import torch

from ess_po import ESSStats, step_stats
from ess_po.integrations.parallel import ess_process_group

from .free_path import OnPolicyRecord, all_ranks_agree, padded
from .trl_guard import warn_on_trl_conflict

STEP_LOSS_NAME: Final = "ess_step"
"""``policy_loss.loss_mode`` of the loss with one ESS per optimizer step."""
STEP_SCOPE_ENV: Final = "ESS_PO_VERL_STEP_SCOPE"
"""Environment variable: ``1`` makes the plugin install the step-scope worker when verl loads it."""


def loss_mode(loss_function: Any) -> str | None:
    """``policy_loss.loss_mode`` of verl's ``partial(ppo_loss, config=actor_config)``."""
    config = getattr(loss_function, "keywords", {}).get("config")
    policy_loss = getattr(config, "policy_loss", None)
    if policy_loss is None:
        return None
    if isinstance(policy_loss, Mapping):
        return policy_loss.get("loss_mode", None)
    return getattr(policy_loss, "loss_mode", None)


class StepScope:
    """The ESS process group of this process and the statistics of the step being trained.

    Attributes:
        group: the ``torch.distributed`` group set by ``set_process_group`` (``None``: automatic,
            :func:`ess_po.integrations.parallel.ess_process_group`).
        free_path: whether the worker may take the free path (``enable_step_scope(free_path=)``).
        stats: 0-dim :class:`ess_po.ESSStats` of the optimizer step being trained, or ``None``
            outside ``engine.train_batch`` (set by :meth:`active`).
        free: whether ``stats`` came from the free path (no forward).
    """

    def __init__(self) -> None:
        self.group: Any = None
        self.free_path = True
        self.stats: ESSStats | None = None
        self.free = False

    def process_group(self) -> Any:
        """The group the ESS statistics are all-reduced over."""
        return ess_process_group(self.group)

    @contextlib.contextmanager
    def active(self, stats: ESSStats, free: bool = False) -> Iterator[None]:
        """Hand ``stats`` to every ``ess_step`` loss call inside the block."""
        self.stats, self.free = stats, free
        try:
            yield
        finally:
            self.stats, self.free = None, False

    def rank_stats(self, log_ratio: torch.Tensor, mask: torch.Tensor) -> ESSStats:
        """Statistics of this rank's ``(B, T)`` share of the step, all-reduced over the ESS group
        (every rank of the step gets the same ESS)."""
        return step_stats([(log_ratio, mask)], process_group=self.process_group())

    def prepass(self, engine: Any, data: Any) -> ESSStats:
        """A no-grad forward through verl's micro-batch loop (``forward_backward_batch(...,
        forward_only=True)``, ``compute_log_prob``'s path) in the engine's current mode, then
        :meth:`rank_stats` of ``log_prob - old_log_prob`` on the valid response tokens."""
        from verl.workers.utils.padding import no_padding_2_padding

        probe = data.copy()  # verl writes bookkeeping keys into the TensorDict it is given
        with torch.no_grad():
            output = engine.forward_backward_batch(probe, None, forward_only=True)
        log_prob = no_padding_2_padding(output["model_output"]["log_probs"], probe)
        fields = probe.select("response_mask", "old_log_probs").to_padded_tensor()
        width = log_prob.shape[-1]
        mask = fields["response_mask"].to(torch.bool)[:, :width]
        return self.rank_stats(log_prob.float() - fields["old_log_probs"][:, :width].float(), mask)

    def free_stats(self, data: Any) -> ESSStats:
        """The free path: :meth:`rank_stats` of ``d = 0`` on this rank's valid tokens."""
        from verl.utils.device import get_device_id

        mask = padded(data["response_mask"]).to(device=get_device_id(), dtype=torch.bool)
        return self.rank_stats(torch.zeros(mask.shape, device=mask.device), mask)

    def attach(self, worker: Any) -> None:
        """Wrap a built ``TrainingWorker``'s engine: count parameter changes, record
        ``compute_log_prob`` outputs, and compute the step statistics around ``train_batch``
        when ``policy_loss.loss_mode`` is ``ess_step`` (other modes are untouched)."""
        engine = worker.engine
        record = worker._ess_on_policy = OnPolicyRecord(engine)

        def touching(method: Any) -> Any:
            def call(*args: Any, **kwargs: Any) -> Any:
                try:
                    return method(*args, **kwargs)
                finally:
                    record.touch()

            return call

        for name in ("optimizer_step", "load_checkpoint", "initialize"):
            setattr(engine, name, touching(getattr(engine, name)))
        train_batch, infer_batch = touching(engine.train_batch), worker.infer_batch

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
            if loss_mode(loss_function) != STEP_LOSS_NAME:
                return train_batch(data, loss_function)
            free = all_ranks_agree(self.free_path and record.covers(data))
            stats = self.free_stats(data) if free else self.prepass(engine, data)
            with self.active(stats, free):
                return train_batch(data, loss_function)

        worker.infer_batch = infer_batch_recorded
        engine.train_batch = train_batch_with_step_stats

    def install(self, free_path: bool = True) -> None:
        """Set ``ActorRolloutRefWorker.actor_worker_cls`` to a ``TrainingWorker`` subclass that
        calls :meth:`attach` once built (idempotent; a later call only changes ``free_path``)."""
        from verl.workers import engine_workers

        self.free_path = bool(free_path)
        if getattr(engine_workers.ActorRolloutRefWorker.actor_worker_cls, "_ess_step_scope", None):
            return
        scope = self

        class ESSStepTrainingWorker(engine_workers.TrainingWorker):
            _ess_step_scope = scope

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                warn_on_trl_conflict()  # before verl builds the model and fails next to trl
                super().__init__(*args, **kwargs)
                scope.attach(self)

        engine_workers.ActorRolloutRefWorker.actor_worker_cls = ESSStepTrainingWorker
