r"""Conditions of the off-policy study: how the trained batch departs from the trainer's policy.

A condition combines four knobs, each a source of off-policyness a real RL system has:

* the rollout engine's numerics (``sampler``): ``"fp32"`` (the trainer's own weights and
  precision), ``"bf16"`` (weights and activations in bfloat16), ``"fp8-tensor"`` /
  ``"fp8-channel"`` (every linear layer's weight fake-quantized to ``torch.float8_e4m3fn`` with
  one absmax scale per tensor / per output channel, as FP8 inference engines store them, and
  activations in bfloat16; the tied embedding / LM head stays bfloat16, as engines keep it);
* the sampling temperature :math:`\tau` of the engine; the behaviour log-probabilities are those
  of the distribution actually sampled, :math:`\log\operatorname{softmax}(z/\tau)`, unless
  ``report_untempered`` (an engine that reports :math:`\log\operatorname{softmax}(z)` while
  sampling at :math:`\tau`: the ratios then look on-policy although the samples are not);
* staleness ``k`` (asynchronous rollouts: train on the batch sampled ``k`` updates ago);
* ``epochs``: optimizer updates per batch (``num_iterations``);
* ``lr``: the learning rate (``None``: the study's).

The trainer is always float32 at temperature 1, and every method gets the engine's numbers as
:math:`\log\mu` (= old log-probs).
"""

from __future__ import annotations

from dataclasses import dataclass

SAMPLERS = ("fp32", "bf16", "fp8-tensor", "fp8-channel")


@dataclass(frozen=True)
class Condition:
    """One off-policy regime. See the module docstring for the knobs."""

    name: str
    staleness: int = 0
    epochs: int = 1
    sampler: str = "fp32"
    temperature: float = 1.0
    report_untempered: bool = False
    sweep: str = ""  # name of the harshness sweep this condition belongs to ("" = none)
    level: float = 0.0  # the sweep's knob value, for plotting
    lr: float | None = None

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")

    @property
    def mismatched(self) -> bool:
        """Whether the rollout engine differs from the trainer."""
        return self.sampler != "fp32" or self.temperature != 1.0

    @property
    def rollout_correction_applies(self) -> bool:
        """TIS/MIS differ from their clipped surrogate only where trainer-old != behaviour."""
        return self.staleness > 0 or self.mismatched

    @property
    def cost(self) -> float:
        """Relative run cost, for scheduling the costliest runs first."""
        return self.epochs + 0.3 * self.mismatched


def _tempered(t: float) -> Condition:
    return Condition(f"temp-{t}", temperature=t, sweep="temperature", level=t)


CONDITIONS: dict[str, Condition] = {
    c.name: c
    for c in (
        Condition("on-policy", sweep="temperature", level=1.0),
        _tempered(1.5),
        _tempered(2.0),
        Condition("temp-1.5-untempered-logp", temperature=1.5, report_untempered=True),
        Condition("fp8", sampler="fp8-tensor"),
        Condition("fp8-channel", sampler="fp8-channel"),
        Condition("fp8-stale-4-ep2", sampler="fp8-tensor", staleness=4, epochs=2),
    )
}
"""The main study's conditions. ``on-policy``, ``temp-1.5``, ``temp-2.0`` form the harshness sweep
(the knob: the rollout engine's sampling temperature, log-probs of the distribution sampled).
The staleness sweep is :data:`STALENESS_SWEEP`."""

SUBSETS: dict[str, tuple[str, ...]] = {
    # On-policy every loss has the same gradient (all ratios 1, one update per batch): two
    # methods show the reference curve.
    "on-policy": ("ess", "clip-0.2"),
    # The engine is the fp32 trainer at T = 1.5 reporting T = 1 log-probs: every ratio is 1 and
    # each batch gets one update, so every method's gradient is REINFORCE's (two show it).
    "temp-1.5-untempered-logp": ("ess", "clip-0.2"),
}
"""Methods run per condition (absent: all)."""


def _stale(k: int) -> Condition:
    return Condition(f"stale-{k}-ep2", staleness=k, epochs=2, sweep="staleness", level=k)


STALENESS_SWEEP: dict[str, Condition] = {c.name: c for c in (_stale(4), _stale(16), _stale(32))}
"""A second harshness knob, run as its own part (``--parts staleness``, written to
``<out>/staleness``): asynchronous staleness k with 2 epochs per batch."""

QUICK_CONDITIONS: dict[str, Condition] = {
    "fp8": CONDITIONS["fp8"],
    "temp-2.0": CONDITIONS["temp-2.0"],
    "stale-4-ep2": Condition("stale-4-ep2", staleness=4, epochs=2),
}

PHASE2_CONDITIONS: dict[str, Condition] = {
    "stale-32-ep2": STALENESS_SWEEP["stale-32-ep2"],
}
"""Where the micro-batch / ESS-scope comparison runs (issue 15's evidence)."""


MAP_LRS = (5e-4, 1.5e-3, 5e-3)
MAP_STALENESS = (0, 4, 16, 64)


def _map(lr: float, k: int, epochs: int) -> Condition:
    return Condition(f"lr{lr:g}-k{k}-ep{epochs}", staleness=k, epochs=epochs, lr=lr, level=k)


MAP_CONDITIONS: dict[str, Condition] = {
    c.name: c for c in (_map(lr, k, e) for lr in MAP_LRS for e in (1, 2) for k in MAP_STALENESS)
}
"""The learning-rate x staleness map: lr in :data:`MAP_LRS`, k in :data:`MAP_STALENESS`, 1 or 2
epochs per batch."""

MAP_SUBSETS: dict[str, tuple[str, ...]] = {
    name: ("ess", "clip-0.2")
    for name, c in MAP_CONDITIONS.items()
    if c.staleness == 0 and c.epochs == 1
}
"""On-policy cells (k = 0, one update per batch): every method has REINFORCE's gradient."""

CONFIRM_CONDITIONS: dict[str, Condition] = {
    c.name: c
    for c in (
        _map(5e-4, 0, 1),
        _map(5e-4, 16, 2),
        _map(5e-4, 64, 2),
        _map(5e-3, 16, 1),
        _map(5e-3, 64, 2),
    )
}
"""The confirmation task's cells (fixed before the runs)."""
