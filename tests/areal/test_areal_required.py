"""``ESS_PO_REQUIRE_AREAL=1`` (set by ``.ci/areal.sh``) turns the AReaL modules' skip into a
failure (``ess_po.testing.requirements.require``).

Cheap in any environment: an ``areal.py`` that raises ImportError stands first on the child's
``PYTHONPATH``, so the module fails (or skips) at collection, before AReaL's engine is touched.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ess_po.testing.processes import child_env

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a child pytest that imports torch and the hosts: ~5 s
@pytest.mark.parametrize("required", [True, False])
def test_missing_areal_fails_only_when_required(tmp_path: Path, required: bool) -> None:
    (tmp_path / "areal.py").write_text("raise ImportError('no AReaL here')\n")
    module = Path(__file__).with_name("test_areal_loss.py")
    env = child_env(PYTHONPATH=str(tmp_path), ESS_PO_REQUIRE_AREAL="1" if required else None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(module), "-q", "-rs", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if required:
        assert proc.returncode != 0, proc.stdout[-2000:]
        assert "ESS_PO_REQUIRE_AREAL is set but areal does not import" in proc.stdout
    else:
        assert proc.returncode == 5, proc.stdout[-2000:]  # pytest's "no tests ran": skipped
        assert "run .ci/areal.sh" in proc.stdout, proc.stdout[-2000:]
