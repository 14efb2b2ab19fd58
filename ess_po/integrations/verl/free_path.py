"""The free path of ``ess_step``: is a mini-batch's ``old_log_prob`` the current policy's?

When verl trains a mini-batch at the parameters whose ``compute_log_prob`` produced its
``old_log_probs``, the log-ratio ``d = log_prob - old_log_prob`` is 0 on every valid token and the
step's statistics are those of ``d = 0`` on the mask (ESS = 1): no pre-pass forward is needed.
:class:`OnPolicyRecord` decides this by hashing each sequence that ``compute_log_prob`` returned
and checking, before a step, that every sequence's ``old_log_probs`` match a record bit for bit.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def padded(tensor: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` view of a verl field: jagged nested tensors padded with 0."""
    return torch.nested.to_padded_tensor(tensor, 0) if tensor.is_nested else tensor


def param_fingerprint(engine: Any) -> tuple[tuple[int, int], ...] | None:
    """``(id, _version)`` of every parameter of the engine's module(s); None when there are none.

    PyTorch bumps a tensor's ``_version`` on every in-place write through it (an optimizer step,
    ``load_state_dict``'s ``copy_``); a replaced parameter has a new ``id``.
    """
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


def _temperatures(data: Any, rows: int) -> list[Any] | None:
    from verl.utils import tensordict_utils as tu

    temperature = tu.get(data, "temperature", default=None)
    if isinstance(temperature, torch.Tensor) and temperature.numel() == rows:
        return temperature.reshape(rows).double().tolist()
    if isinstance(temperature, (list, tuple)) and len(temperature) == rows:
        return [float(t) for t in temperature]
    if temperature is None or isinstance(temperature, (int, float)):
        return [temperature] * rows
    return None


def sequence_digests(data: Any, log_probs: torch.Tensor) -> list[bytes] | None:
    """One 16-byte digest per sequence of ``data``.

    Covers its token ids, position ids, temperature, the positions of its valid response tokens
    and ``log_probs`` (``(B, T)``, float32, aligned with ``response_mask``) on them. None when
    ``data`` holds inputs the digest does not cover (multi-modal), so such batches never take the
    free path.
    """
    if "multi_modal_inputs" in data:
        return None
    mask = padded(data["response_mask"]).bool().cpu()
    values = padded(log_probs).detach().float().cpu()
    rows = mask.shape[0]
    temperatures = _temperatures(data, rows)
    ids, positions = data["input_ids"].unbind(0), data["position_ids"].unbind(0)
    if temperatures is None or len(ids) != rows or len(positions) != rows:
        return None
    if values.shape[0] != rows:
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


class OnPolicyRecord:
    """Which log-probs this worker's ``compute_log_prob`` produced at the current parameters.

    The parameter *state* is ``(updates, fingerprint)``: ``updates`` counts the engine calls that
    can change the parameters (:meth:`touch`; the worker calls it after ``optimizer_step``,
    ``train_batch``, ``load_checkpoint`` and ``initialize``) and ``fingerprint`` is
    :func:`param_fingerprint`. :meth:`record` keeps the digests of a ``compute_log_prob`` output
    with the state it ran at; :meth:`covers` holds when the state is unchanged and every sequence
    of a mini-batch carries, as ``old_log_probs``, bit for bit recorded log-probs. Bypass mode
    (rollout log-probs as ``old_log_probs``), edited ``old_log_probs``, a mini-batch after an
    optimizer step or a LoRA reference forward never match.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.updates = 0
        self.state: tuple | None = None
        self.digests: set[bytes] = set()

    def current_state(self) -> tuple | None:
        fingerprint = param_fingerprint(self.engine)
        return None if fingerprint is None else (self.updates, fingerprint)

    def touch(self) -> None:
        """The parameters may have changed: forget every record."""
        self.updates += 1
        self.state, self.digests = None, set()

    def record(self, data: Any, output: Any, state: tuple | None) -> None:
        """Record ``compute_log_prob``'s ``output`` for ``data`` if it ran at ``state``, now."""
        from verl.workers.utils.padding import no_padding_2_padding

        if state is None or state != self.current_state():
            return
        # The trainer's own conversion of compute_log_prob's output into old_log_probs
        # (RayPPOTrainer._compute_old_log_prob); a trainer that converts differently stores
        # other bits and falls back to the pre-pass.
        try:
            digests = sequence_digests(data, no_padding_2_padding(output["log_probs"], data))
        except Exception:  # a layout this record does not know: no record, hence the pre-pass
            return
        if digests is None:
            return
        if state != self.state:
            self.state, self.digests = state, set()
        self.digests.update(digests)

    def covers(self, data: Any) -> bool:
        """Whether every sequence's ``old_log_probs`` in ``data`` is recorded at this state."""
        state = self.current_state()
        if state is None or state != self.state:
            return False
        try:
            digests = sequence_digests(data, data["old_log_probs"])
        except Exception:  # a layout this record does not know: the pre-pass
            return False
        return digests is not None and set(digests) <= self.digests


def all_ranks_agree(flag: bool) -> bool:
    """``flag`` on every rank of the default process group (a MIN all-reduce of one integer), so
    that all ranks take the same branch (the pre-pass and its all-reduce are collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    from verl.utils.device import get_device_id

    vote = torch.tensor([int(flag)], dtype=torch.int32, device=get_device_id())
    dist.all_reduce(vote, op=dist.ReduceOp.MIN)
    return bool(vote.item())
