"""Test-only workarounds that let verl 0.9.1's FSDP2 actor run in one CPU process (gloo).

Nothing here is used by ess-po itself; the adapter (``ess_po.integrations.verl``) runs unchanged.
Each workaround addresses one thing verl 0.9.1 assumes about a GPU cluster:

1. **Platform.** verl's platform layer knows nvidia / npu / rocm and falls back to ``nvidia``
   without an accelerator (``AssertionError: Torch not compiled with CUDA enabled`` on the first
   device call). :class:`PlatformCPU` implements verl's ``PlatformBase`` for ``device_name ==
   "cpu"`` with the gloo backend and is installed with ``verl.plugin.platform.set_platform``.
2. **Engine registry.** The FSDP engines are registered for ``cuda`` / ``npu`` only;
   ``VERL_ENGINE_DEVICE=cuda`` (verl's own override) selects the FSDP class, which then places
   tensors with ``get_device_name()``, i.e. on the CPU.
3. **FSDP version.** FSDP1 refuses CPU parameters with ``sync_module_states=True``; the tests use
   ``actor.strategy=fsdp2``.
4. **Attention.** verl defaults to ``flash_attention_2``; the tests set
   ``model.override_config.attn_implementation=eager``.
5. **TRL in the same environment.** verl's FSDP engine calls ``apply_monkey_patch``, which imports
   ``AutoModelForCausalLMWithValueHead`` from ``trl`` whenever ``trl`` is installed; TRL 1.16 no
   longer has that class, so the actor cannot start (see ``tests/test_verl_trl_guard.py``).
   :func:`hide_trl` makes ``trl`` invisible in the test subprocess, exactly as if it were not
   installed (verl checks ``importlib.util.find_spec("trl")``, which returns None for a
   ``sys.modules`` entry set to None).
6. **Imports.** On this path verl imports uvicorn, fastapi, torchdata and cachetools; they are in
   the ``test`` extra.
7. **Compile.** ``use_torch_compile=False`` (inductor on CPU is slow and not what is tested).

The module must be imported (and :func:`setup` called) before verl's platform is first used.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

VERL_CONFIG_DIR = None  # resolved lazily (importing verl is slow)


def hide_trl() -> None:
    """Make ``trl`` look uninstalled in this process (workaround 5). Call before verl builds a model."""
    loaded = [name for name in sys.modules if name == "trl" or name.startswith("trl.")]
    if any(sys.modules[name] is not None for name in loaded):
        raise RuntimeError("hide_trl() must run before trl is imported")
    sys.modules["trl"] = None  # type: ignore[assignment]


class _CPUDeviceModule(ModuleType):
    """``torch.cpu`` plus the ``torch.cuda`` memory queries verl logs (all 0 on the CPU)."""

    def __init__(self) -> None:
        super().__init__("verl_cpu_device")

    def __getattr__(self, name: str) -> Any:
        if hasattr(torch.cpu, name):
            return getattr(torch.cpu, name)
        if name.startswith(("memory_", "max_memory_", "reset_")) or name in ("empty_cache",):
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

    @PlatformRegistry.register(platform="cpu")
    class PlatformCPU(PlatformBase):
        """verl platform for a CPU-only process (gloo, no profiler, no IPC)."""

        @property
        def device_name(self) -> str:
            return "cpu"

        @property
        def vendor_name(self) -> str:
            return "cpu"

        @property
        def device_module(self) -> ModuleType:
            return _CPUDeviceModule()

        def is_available(self) -> bool:
            return True

        def current_device(self) -> Any:
            # verl passes this straight to ``.to(...)`` / ``torch.device(...)``; an int would
            # mean an accelerator index.
            return "cpu"

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index: int) -> None:
            return None

        def synchronize(self, device_index: int | None = None) -> None:
            return None

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            return None

        def empty_cache(self) -> None:
            return None

        def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
            return (None, None)

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            return "CUDA_VISIBLE_DEVICES"

        @contextmanager
        def nvtx_range(self, msg: str):
            yield

        def profiler_start(self) -> None:
            return None

        def profiler_stop(self) -> None:
            return None

        def ray_resource_name(self) -> str:
            return "CPU"

        def ray_noset_envvars(self) -> list[str]:
            return []

        def is_ipc_supported(self) -> bool:
            return False

        def cudart(self) -> Any:
            return None

    return PlatformCPU


def setup(init_file: Path) -> None:
    """Apply workarounds 1, 2 and 5 and start the gloo group.

    One process (rank 0 of 1, a ``file://`` rendezvous at ``init_file``) unless a launcher set
    ``WORLD_SIZE`` > 1 (``torchrun``): then the ``env://`` rendezvous of its ``MASTER_ADDR`` /
    ``MASTER_PORT``, ``RANK`` and ``WORLD_SIZE``, which verl's worker also reads."""
    hide_trl()
    os.environ["VERL_ENGINE_DEVICE"] = "cuda"
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "0",
    }.items():
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


def save_tiny_model(
    path: Path, *, seed: int = 0, hidden_size: int = 32, num_layers: int = 2
) -> Any:
    """Tiny Qwen2 + character tokenizer saved to ``path`` (verl loads models by path)."""
    from ess_po.testing.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(
        tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=4, seed=seed
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return tokenizer


def run_actor_worker(out_dir: Path, *args: str, timeout: int) -> dict[str, Any]:
    """Run ``tests/verl_actor_worker.py OUT_DIR *args`` in a fresh interpreter (no external verl
    modules, one thread) and load the ``result.pt`` it writes."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_USE_EXTERNAL")}
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    proc = subprocess.run(
        [sys.executable, str(repo / "tests" / "verl_actor_worker.py"), str(out_dir), *args],
        env=env,
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(proc.stderr[-4000:])
    return torch.load(out_dir / "result.pt", weights_only=False)


def run_actor_ranks(out_dir: Path, world: int, *, timeout: int) -> list[dict[str, Any]]:
    """Run ``tests/verl_actor_worker.py OUT_DIR ranks`` as ``world`` gloo processes and load the
    ``rank{r}.pt`` each writes.

    Launch as in ``tests/trl_helpers.py::run_two_processes``: torchrun's standalone rendezvous on
    a port the OS picks, on 127.0.0.1 (gloo bound to the loopback interface), the parent's
    distributed variables removed (and verl's external-module variables), one thread per
    process, a wall-clock timeout; the workers leave through a
    barrier. On failure the launcher's output tail is the assertion message."""
    import subprocess

    from trl_helpers import _worker_env  # the TRL 2-rank test's scrubbed environment

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in _worker_env().items() if not k.startswith("VERL_USE_EXTERNAL")}
    env["TOKENIZERS_PARALLELISM"] = "false"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={world}",
        "--standalone",
        "--local-addr=127.0.0.1",
        str(repo / "tests" / "verl_actor_worker.py"),
        str(out_dir),
        "ranks",
    ]
    proc = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]
