"""``ESS_PO_REQUIRE_VLLM=1`` (set by ``.ci/vllm.sh``) turns the vLLM module's skip into a failure.

Cheap in any environment: a ``vllm.py`` that raises ImportError stands first on the child's
``PYTHONPATH``, so the module fails at collection, before any engine starts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ess_po.testing.processes import child_env

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a child pytest that imports torch and the hosts: ~5 s
def test_missing_vllm_fails_when_required(tmp_path: Path) -> None:
    (tmp_path / "vllm.py").write_text("raise ImportError('no vLLM here')\n")
    module = Path(__file__).with_name("test_vllm_colocate.py")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(module), "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=child_env(ESS_PO_REQUIRE_VLLM="1", PYTHONPATH=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "ESS_PO_REQUIRE_VLLM is set but vLLM does not import" in proc.stdout, proc.stdout[-2000:]
