"""The core stays framework-free and typed."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import ess_po


def test_core_imports_only_torch() -> None:
    code = (
        "import sys, ess_po, ess_po.integrations; "
        "heavy = {'trl', 'transformers', 'verl', 'accelerate', 'datasets', 'ray'}; "
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_ships_py_typed() -> None:
    assert (Path(ess_po.__file__).parent / "py.typed").is_file()


def test_public_api_is_documented() -> None:
    for name in ess_po.__all__:
        obj = getattr(ess_po, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__ and obj.__doc__.strip(), name
