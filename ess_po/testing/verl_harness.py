"""verl 0.9.1's own FSDP2 actor in one CPU process (gloo), for tests and benchmarks.

The plugin (:mod:`ess_po.integrations.verl`) runs unchanged; this module works around what
verl assumes about a GPU cluster and drives its trainer -> worker -> engine -> ``ppo_loss``
chain on a tiny Qwen2. The workarounds:

1. **Platform.** verl knows nvidia / npu / rocm and falls back to ``nvidia`` without an
   accelerator; a ``PlatformCPU`` (gloo backend) is installed with ``set_platform``.
2. **Engine registry.** The FSDP engines are registered for ``cuda`` / ``npu`` only;
   ``VERL_ENGINE_DEVICE=cuda`` selects the FSDP class, which places tensors on the CPU.
3. **FSDP version.** FSDP1 refuses CPU parameters with ``sync_module_states``: ``fsdp2``.
4. **Attention.** ``attn_implementation=eager`` instead of ``flash_attention_2``.
5. **TRL.** verl's FSDP engine imports ``AutoModelForCausalLMWithValueHead`` from ``trl``
   whenever ``trl`` is importable, and TRL 1.16 lacks it: :func:`hide_trl`.
6. **Imports.** verl imports uvicorn, fastapi, torchdata and cachetools on this path (the
   ``test`` extra).
7. **Compile.** ``use_torch_compile=False``.

Call :func:`setup` before verl's platform is first used. Needs the ``verl`` extra.
"""

from __future__ import annotations

import os
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

#: The rollout batch of :func:`rollout_batch`: prompts x responses per prompt, padded lengths.
N_PROMPTS, ROLLOUT_N, PROMPT_LEN, RESPONSE_LEN = 4, 4, 4, 6
#: Prompts per mini-batch (x ``ROLLOUT_N`` = 8 sequences per optimizer step), sequences per call.
MINI_BATCH_PROMPTS, MICRO_BATCH = 2, 2


def hide_trl() -> None:
    """Make ``trl`` look uninstalled in this process (``find_spec`` returns None for a
    ``sys.modules`` entry set to None). Call before trl is imported."""
    loaded = [name for name in sys.modules if name == "trl" or name.startswith("trl.")]
    if any(sys.modules[name] is not None for name in loaded):
        raise RuntimeError("hide_trl() must run before trl is imported")
    sys.modules["trl"] = None  # type: ignore[assignment]


class _CPUDeviceModule(types.ModuleType):
    """``torch.cpu`` plus the ``torch.cuda`` memory queries verl logs (all 0 on the CPU)."""

    def __init__(self) -> None:
        super().__init__("verl_cpu_device")

    def __getattr__(self, name: str) -> Any:
        if hasattr(torch.cpu, name):
            return getattr(torch.cpu, name)
        if name.startswith(("memory_", "max_memory_", "reset_")) or name == "empty_cache":
            return lambda *args, **kwargs: 0
        if name == "get_device_name":
            return lambda *args, **kwargs: "CPU"
        if name == "mem_get_info":
            return lambda *args, **kwargs: (0, 0)
        raise AttributeError(name)


def _platform_cpu_class() -> type:
    from verl.plugin.platform import PlatformBase, PlatformRegistry

    existing = PlatformRegistry.get("cpu")
    if existing is not None:
        return existing

    def constant(value: Any) -> Any:
        return lambda self, *args, **kwargs: value

    @PlatformRegistry.register(platform="cpu")
    class PlatformCPU(PlatformBase):
        """verl platform for a CPU-only process (gloo, no profiler, no IPC)."""

        device_name = property(constant("cpu"))
        vendor_name = property(constant("cpu"))
        device_module = property(lambda self: _CPUDeviceModule())
        is_available = constant(True)
        current_device = constant("cpu")  # verl passes it to .to(...): an int means a GPU
        device_count = constant(1)
        set_device = synchronize = set_allocator_settings = empty_cache = constant(None)
        profiler_start = profiler_stop = cudart = constant(None)
        get_device_capability = constant((None, None))
        communication_backend_name = constant("gloo")
        visible_devices_envvar = constant("CUDA_VISIBLE_DEVICES")
        ray_resource_name = constant("CPU")
        ray_noset_envvars = constant([])
        is_ipc_supported = constant(False)

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        manual_seed_all = manual_seed

        @contextmanager
        def nvtx_range(self, msg: str):
            yield

    return PlatformCPU


def setup(init_file: Path) -> None:
    """Apply workarounds 1, 2 and 5 and start the gloo group.

    One process (rank 0 of 1, a ``file://`` rendezvous at ``init_file``) unless a launcher set
    ``WORLD_SIZE`` > 1 (``torchrun``): then its ``env://`` rendezvous, which verl's worker reads.
    """
    hide_trl()
    os.environ["VERL_ENGINE_DEVICE"] = "cuda"
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    for key, value in {**defaults, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}.items():
        os.environ.setdefault(key, value)
    from verl.plugin.platform import set_platform

    set_platform(_platform_cpu_class()())
    import torch.distributed as dist

    if dist.is_initialized():
        return
    world = int(os.environ["WORLD_SIZE"])
    if world == 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    else:
        dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=world)


def compose(overrides: list[str]) -> Any:
    """verl's ``ppo_trainer.yaml`` composed by Hydra with ``overrides`` (as ``main_ppo`` does)."""
    import verl
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    config_dir = Path(verl.__file__).parent / "trainer" / "config"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return hydra_compose(config_name="ppo_trainer", overrides=overrides)


def save_model(path: Path, **model_kwargs: Any) -> Any:
    """:func:`ess_po.testing.tiny.save_tiny_model` at ``path`` (verl loads models by path): a
    Qwen2 of hidden size 32 unless ``model_kwargs`` say otherwise. Returns its tokenizer."""
    from ess_po.testing.tiny import build_tiny_tokenizer, save_tiny_model

    save_tiny_model(path, **{"hidden_size": 32, **model_kwargs})
    return build_tiny_tokenizer()


def overrides(
    model_dir: Path, loss_mode: str, lr: float, extra: list[str], micro: int = MICRO_BATCH
) -> list[str]:
    """Hydra overrides of the actor (FSDP2, eager attention, no compile) for ``loss_mode``."""
    actor = "actor_rollout_ref.actor"
    return [
        f"actor_rollout_ref.model.path={model_dir}",
        "+actor_rollout_ref.model.override_config.attn_implementation=eager",
        "actor_rollout_ref.model.enable_gradient_checkpointing=False",
        f"{actor}.strategy=fsdp2",
        f"{actor}.use_torch_compile=False",
        f"{actor}.fsdp_config.use_torch_compile=False",
        f"{actor}.ppo_mini_batch_size={MINI_BATCH_PROMPTS}",
        f"{actor}.ppo_micro_batch_size_per_gpu={micro}",
        f"{actor}.optim.lr={lr}",
        f"{actor}.optim.weight_decay=0.0",
        f"actor_rollout_ref.rollout.n={ROLLOUT_N}",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.name=vllm",
        f"{actor}.policy_loss.loss_mode={loss_mode}",
        "trainer.n_gpus_per_node=1",
        *extra,
    ]


def rollout_batch(tokenizer: Any, seed: int = 0) -> Any:
    """A ``DataProto`` of ``N_PROMPTS * ROLLOUT_N`` sequences as verl's trainer holds it:
    left-padded ``(B, PROMPT_LEN)`` prompts, right-padded ``(B, RESPONSE_LEN)`` responses,
    GRPO-style sequence advantages (zero on padding)."""
    from verl.protocol import DataProto

    g = torch.Generator().manual_seed(seed)
    bsz, vocab, pad = N_PROMPTS * ROLLOUT_N, len(tokenizer), tokenizer.pad_token_id
    prompts = torch.full((bsz, PROMPT_LEN), pad)
    responses = torch.full((bsz, RESPONSE_LEN), pad)
    prompt_mask = torch.zeros(bsz, PROMPT_LEN, dtype=torch.long)
    response_mask = torch.zeros(bsz, RESPONSE_LEN, dtype=torch.long)
    for i in range(bsz):
        pl = int(torch.randint(1, PROMPT_LEN + 1, (), generator=g))
        rl = int(torch.randint(1, RESPONSE_LEN + 1, (), generator=g))
        prompts[i, PROMPT_LEN - pl :] = torch.randint(3, vocab, (pl,), generator=g)
        prompt_mask[i, PROMPT_LEN - pl :] = 1
        responses[i, :rl] = torch.randint(3, vocab, (rl,), generator=g)
        response_mask[i, :rl] = 1
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    advantages = torch.randn(bsz, 1, generator=g).expand(bsz, RESPONSE_LEN) * response_mask
    batch = DataProto.from_dict(
        tensors={
            "prompts": prompts,
            "responses": responses,
            "input_ids": torch.cat([prompts, responses], 1),
            "attention_mask": attention_mask,
            "position_ids": torch.clamp(torch.cumsum(attention_mask, 1) - 1, min=0),
            "response_mask": response_mask,
            "advantages": advantages.float().contiguous(),
        }
    )
    # What the rollout / fit loop put in meta_info before the actor sees the batch.
    batch.meta_info["temperature"] = 1.0
    batch.meta_info["global_token_num"] = attention_mask.sum(-1).tolist()
    return batch


class LossSpy:
    """Wraps the registered policy losses ``modes``; records, per call, what the loss received
    and returned in :attr:`calls` (observes only)."""

    def __init__(self, modes: list[str]) -> None:
        from verl.trainer.ppo import core_algos

        self.calls: list[dict[str, Any]] = []
        for mode in modes:
            fn = core_algos.POLICY_LOSS_REGISTRY[mode]
            core_algos.POLICY_LOSS_REGISTRY[mode] = self._wrap(mode, fn)

    def _wrap(self, mode: str, fn: Any) -> Any:
        def spy(**kwargs: Any) -> Any:
            loss, metrics = fn(**kwargs)
            self.calls.append(
                {
                    "mode": mode,
                    "log_prob_dtype": str(kwargs["log_prob"].dtype),
                    "old_log_prob_dtype": str(kwargs["old_log_prob"].dtype),
                    "old_log_prob": kwargs["old_log_prob"].detach().float().clone(),
                    "log_prob": kwargs["log_prob"].detach().float().clone(),
                    "response_mask": kwargs["response_mask"].clone(),
                    "global_batch_info": dict(kwargs["config"].global_batch_info),
                    "metrics": {k: float(v) for k, v in metrics.items()},
                    "loss": float(loss.detach()),
                }
            )
            return loss, metrics

        return spy


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def build_worker(
    model_dir: Path, loss_mode: str, lr: float, extra: list[str] = (), micro: int = MICRO_BATCH
) -> tuple[Any, list[dict[str, torch.Tensor]]]:
    """An actor ``ActorRolloutRefWorker`` from ``ppo_trainer.yaml`` with :func:`overrides`.

    Returns ``(host, grads)``: ``host`` stands in for verl's trainer (``config``,
    ``actor_rollout_wg``, and ``forward_only_calls``, the engine's no-grad forwards so far);
    ``grads`` receives the full gradients of each optimizer step (a step pre-hook).
    """
    from verl.workers.engine_workers import ActorRolloutRefWorker

    config = compose(overrides(model_dir, loss_mode, lr, list(extra), micro))
    worker = ActorRolloutRefWorker(config.actor_rollout_ref, role="actor")
    worker.init_model()
    grads: list[dict[str, torch.Tensor]] = []
    engine = worker.actor.engine

    def record(optimizer: Any, args: Any, kwargs: Any) -> None:
        params = engine.module.named_parameters()
        grads.append({n: _full(p.grad).clone() for n, p in params if p.grad is not None})

    engine.optimizer.register_step_pre_hook(record)
    host = types.SimpleNamespace(config=config, actor_rollout_wg=worker, forward_only_calls=0)
    forward_backward_batch = engine.forward_backward_batch

    def counted(data: Any, loss_function: Any, forward_only: bool = False) -> Any:
        host.forward_only_calls += bool(forward_only)
        return forward_backward_batch(data, loss_function, forward_only=forward_only)

    engine.forward_backward_batch = counted
    return host, grads


def weights(host: Any) -> dict[str, torch.Tensor]:
    """The actor's full parameters, detached copies."""
    module = host.actor_rollout_wg.actor.engine.module
    return {n: _full(p).detach().clone() for n, p in module.named_parameters()}


def old_log_prob(host: Any, batch: Any) -> Any:
    """verl's recompute (``RayPPOTrainer._compute_old_log_prob``): a ``DataProto`` holding
    ``old_log_probs``."""
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    out, _ = RayPPOTrainer._compute_old_log_prob(host, batch)
    out.batch.pop("entropys")
    return out


def with_known_offsets(host: Any, batch: Any, offsets: Any = None) -> tuple[Any, Any]:
    """``batch`` with ``old_log_probs`` = verl's recomputed log-probs - ``offsets``; with the
    policy frozen (lr 0) the log-ratio of every valid token is then exactly ``offsets``
    (``None``: draw them, 0.5 N(0, 1) on valid tokens, seed 1). Returns the batch and offsets."""
    recomputed = old_log_prob(host, batch)
    if offsets is None:
        g = torch.Generator().manual_seed(1)
        offsets = 0.5 * torch.randn(recomputed.batch["old_log_probs"].shape, generator=g)
        offsets *= batch.batch["response_mask"]
    recomputed.batch["old_log_probs"] = recomputed.batch["old_log_probs"] - offsets
    return batch.union(recomputed), offsets


def update(host: Any, batch: Any) -> dict[str, float]:
    """One actor update (``RayPPOTrainer._update_actor``); the metrics the trainer logs."""
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer
    from verl.utils.metric import reduce_metrics

    output = RayPPOTrainer._update_actor(host, batch)
    return {k: float(v) for k, v in reduce_metrics(output.meta_info["metrics"]).items()}
