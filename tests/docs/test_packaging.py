"""The core stays framework-free and typed."""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


ROOT = Path(__file__).resolve().parents[2]


def test_tiny_without_the_trl_extra_names_the_extra() -> None:
    """Without tokenizers, importing the fixture fails at once with an ImportError naming the
    `trl` extra (not a bare ModuleNotFoundError on first use). Mutation checked: deleting the
    import-time guard in ess_po/testing/tiny.py makes the import succeed and this test fail."""
    code = (
        "import sys; sys.modules['tokenizers'] = None\n"
        "try:\n"
        "    import ess_po.testing.tiny\n"
        "except ImportError as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("ImportError "), out.stdout + out.stderr
    assert "tokenizers" in out.stdout and '".[trl]"' in out.stdout, out.stdout


def _install_lines() -> list[tuple[str, int, str]]:
    files = [
        ROOT / "README.md",
        *(ROOT / "docs").rglob("*.md"),
        *(ROOT / "ess_po" / "integrations").rglob("*.py"),
    ]
    hits = []
    for path in files:
        if "results" in path.relative_to(ROOT).parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"pip install\s+\"?ess-po\b", line):
                hits.append((str(path.relative_to(ROOT)), n, line))
    return hits


def test_index_install_lines_say_once_released() -> None:
    """ess-po is not on PyPI yet: every `pip install ess-po...` line in the README, the docs and
    the adapters' error messages must say it works once released (a checkout or a wheel works
    now). Mutation checked: the old README line `pip install "ess-po[verl]"` fails here."""
    hits = _install_lines()
    assert hits, "the scan found no install lines at all; has the layout changed?"
    bad = [f"{p}:{n}: {line.strip()}" for p, n, line in hits if "released" not in line]
    assert not bad, "install lines that fail today:\n" + "\n".join(bad)


def test_trl_extra_does_not_cap_transformers() -> None:
    """The trl extra leaves transformers to TRL's own range, so installing ess-po does not
    downgrade an up-to-date TRL environment (issue 16); the verl extra keeps verl's cap."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert not [r for r in extras["trl"] if r.startswith("transformers")], extras["trl"]
    assert "transformers<5.11" in extras["verl"], extras["verl"]


def test_constraints_latest_pins_a_newer_transformers() -> None:
    """The second matrix cell must differ from the first where it matters: a transformers
    above verl's cap (< 5.11), pinned exactly."""

    def pins(name: str) -> dict[str, str]:
        lines = (ROOT / name).read_text().splitlines()
        return dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))

    main, latest = pins("constraints.txt"), pins("constraints-latest.txt")
    assert latest["trl"] == main["trl"] and latest["torch"] == main["torch"]
    major, minor = (int(x) for x in latest["transformers"].split(".")[:2])
    assert (major, minor) >= (5, 11), latest["transformers"]


def test_build_outputs_are_ignored_by_git() -> None:
    """`mkdocs build` (site/), benchmark output under benchmarks/results/ and the matrix venv
    stay out of `git status`."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["site/index.html", "benchmarks/results/loss_cost.json", ".venv-latest/bin/python"]
    out = subprocess.run(
        ["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert out.stdout.split() == paths, out.stdout + out.stderr
