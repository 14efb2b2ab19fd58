"""Child processes for tests and benchmarks: one environment scrub, one gloo launcher.

* :func:`child_env` -- the parent's environment without what would steer a child's rendezvous,
  device or thread count.
* :func:`run_ranks` -- ``nprocs`` CPU ranks of a script or module under torchrun's standalone
  rendezvous on 127.0.0.1; raises :class:`RanksFailed` with the output tails on failure.

Standard library only at import (the children import torch themselves).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["RanksFailed", "child_env", "run_ranks"]

#: Variables dropped from the parent's environment, each for a reason:
#: the rendezvous and rank variables a launcher (torchrun, SLURM, accelerate) or an earlier
#: in-process gloo test leaves set; a child would join the parent's group instead of its own.
_DROP = frozenset(
    {
        "MASTER_ADDR",
        "MASTER_PORT",
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "GROUP_WORLD_SIZE",
        "ROLE_RANK",
        "ROLE_NAME",
        "ROLE_WORLD_SIZE",
        "NODE_RANK",
    }
)
_DROP_PREFIXES = (
    "MASTER_",  # MASTER_ADDR/PORT above, and any launcher-specific variant
    "TORCHELASTIC_",  # torchrun's agent state (restart count, run id, agent store)
    "PET_",  # torchrun reads PET_<FLAG> as the default of each of its own flags
    "TORCH_DISTRIBUTED_",  # debug and rendezvous settings of the parent's run
    "ACCELERATE_",  # accelerate's launcher config (mixed precision, process counts, CPU/GPU)
    "VERL_USE_EXTERNAL",  # verl imports the modules these name when it is imported
)
#: Variables set in every child (each overridable through ``child_env(NAME=...)``).
_SET = {
    # one BLAS/OpenMP thread a process: N ranks on a small CI machine, no oversubscription
    "OMP_NUM_THREADS": "1",
    # tokenizers' thread pool warns, and may deadlock, after a fork
    "TOKENIZERS_PARALLELISM": "false",
    # no model hub: every fixture is built in code (ess_po.testing.tiny)
    "HF_HUB_OFFLINE": "1",
    # gloo on the loopback interface: no hostname lookup, whatever the host's interfaces
    "GLOO_SOCKET_IFNAME": "lo0" if sys.platform == "darwin" else "lo",
    # the ranks are CPU processes: no library picks a GPU by LOCAL_RANK
    "CUDA_VISIBLE_DEVICES": "",
}


def child_env(**overrides: str | None) -> dict[str, str]:
    """The environment for a child process of a test or benchmark.

    The parent's ``os.environ`` without the variables that would steer the child's rendezvous
    (``MASTER_*``, ``RANK``, ``WORLD_SIZE``, ... and the ``TORCHELASTIC_``, ``PET_``,
    ``TORCH_DISTRIBUTED_`` and ``ACCELERATE_`` families) or make verl import external modules
    (``VERL_USE_EXTERNAL*``); then ``OMP_NUM_THREADS=1``, ``TOKENIZERS_PARALLELISM=false``,
    ``HF_HUB_OFFLINE=1``, ``GLOO_SOCKET_IFNAME`` set to the loopback interface and
    ``CUDA_VISIBLE_DEVICES=""`` (CPU ranks). Each keyword argument then sets that variable, or
    removes it when ``None``: ``child_env(PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES=None)``.

    Returns a new dict; ``os.environ`` is not changed.
    """
    env = {
        k: v for k, v in os.environ.items() if k not in _DROP and not k.startswith(_DROP_PREFIXES)
    }
    env.update(_SET)
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


class RanksFailed(AssertionError):
    """A :func:`run_ranks` launch exited non-zero or timed out; the message holds the tails of
    the launcher's stdout and stderr (torchrun forwards the ranks' output and tracebacks)."""


def run_ranks(
    target: str | os.PathLike[str],
    nprocs: int,
    args: Sequence[str | os.PathLike[str]] = (),
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 600.0,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``nprocs`` ranks of ``target`` on this machine and wait for them.

    The command is ``python -m torch.distributed.run --standalone --nproc-per-node NPROCS
    --local-addr 127.0.0.1 TARGET *ARGS``: torchrun's standalone rendezvous on a port the OS
    picks, so concurrent launches do not collide. Each rank gets ``RANK``, ``LOCAL_RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; it calls
    ``torch.distributed.init_process_group("gloo")`` (``env://``) itself and writes what the
    parent should check to files under a folder passed in ``args`` (rank ``r`` to ``rank{r}.*``).

    Args:
        target: a script path (``Path`` or a string ending in ``.py``), run as a file, or a
            module name such as ``"ess_po.testing.some_worker"``, run as ``python -m``.
        nprocs: number of ranks (processes).
        args: command-line arguments of every rank, after ``target``.
        env: the children's whole environment; default :func:`child_env`. To change a few
            variables pass ``child_env(NAME=value)``.
        timeout: seconds for the whole run; then the launcher gets SIGTERM (torchrun stops
            every rank) and, 30 s later, SIGKILL.
        cwd: working directory of the launcher and the ranks; default the current one.

    Returns:
        The launcher's ``CompletedProcess`` (``stdout``/``stderr`` as text) after exit code 0.

    Raises:
        RanksFailed: the launcher exited non-zero (a rank failed) or the timeout expired; the
            message holds the tails of its stdout and stderr.
    """
    script = isinstance(target, os.PathLike) or str(target).endswith(".py")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nprocs}",
        "--local-addr=127.0.0.1",
        *([os.fspath(Path(target))] if script else ["-m", str(target)]),
        *(os.fspath(a) for a in args),
    ]
    proc = subprocess.Popen(
        cmd,
        env=dict(child_env() if env is None else env),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        why = None if proc.returncode == 0 else f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        # SIGTERM: torchrun stops its ranks (each runs in a process group of its own) and exits
        proc.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        why = f"timed out after {timeout:g} s"
    if why is not None:
        raise RanksFailed(
            f"{nprocs} ranks of {target} {why}: {' '.join(cmd)}\n"
            f"--- stdout (tail) ---\n{stdout[-3000:]}\n--- stderr (tail) ---\n{stderr[-8000:]}"
        )
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
