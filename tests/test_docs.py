"""The documentation site cannot rot: its examples run, its API reference is complete, it builds.

* Every ```python block of the site's pages (docs/**/*.md) is executed. The blocks of one page
  share a namespace, in order. A block preceded by ``<!-- skip: reason -->`` is not run (for
  blocks that need a GPU, the network, a verl cluster or the reader's own objects).
* Every public name (``__all__`` of ``ess_po`` and of each integration) has a docstring and a
  ``:::`` block on the API page; core names show shapes or an example (docs/hooks/api_check.py,
  which the build runs as well).
* ``mkdocs build --strict`` succeeds (skipped when MkDocs is not installed: ``pip install
  -e ".[docs]"``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "hooks"))

# ```python fences, possibly indented (content tabs); group 1 = indent, 2 = body
_FENCE = re.compile(r"^([ \t]*)```python[^\n]*\n(.*?)^\1```[ \t]*$", re.MULTILINE | re.DOTALL)
_SKIP = re.compile(r"<!--\s*skip:\s*(\S[^>]*?)\s*-->\s*$")
# Optional frameworks: a page whose example needs one that is not installed is skipped.
_OPTIONAL = {"trl", "transformers", "datasets", "tokenizers", "accelerate", "verl", "peft"}


def doc_pages() -> list[Path]:
    skip_dirs = {"results", "hooks", "scripts"}
    return sorted(
        p
        for p in DOCS.rglob("*.md")
        if not (set(p.relative_to(DOCS).parts[:-1]) & skip_dirs) and not p.name.startswith("_")
    )


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line, code, skip_reason)`` for each ```python block of a Markdown text."""
    blocks = []
    for m in _FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").splitlines()
        previous = before[-1].strip() if before else ""
        skip = _SKIP.search(previous)
        line = text.count("\n", 0, m.start()) + 1
        blocks.append((line, textwrap.dedent(m.group(2)), skip.group(1) if skip else None))
    return blocks


PAGES = [p for p in doc_pages() if python_blocks(p.read_text())]


def test_pages_are_found() -> None:
    names = {p.relative_to(DOCS).as_posix() for p in PAGES}
    assert {"index.md", "concepts.md", "guides/pytorch.md", "api.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_page_examples_run(page: Path) -> None:
    namespace: dict[str, object] = {"__name__": f"docs.{page.stem}"}
    ran = 0
    for line, code, skip in python_blocks(page.read_text()):
        if skip:
            continue
        try:
            exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)
        except ModuleNotFoundError as err:
            if (err.name or "").split(".")[0] in _OPTIONAL:
                pytest.skip(f"{page.name}:{line} needs the optional dependency {err.name}")
            raise
        ran += 1
    if ran == 0:
        pytest.skip(f"every example of {page.name} is marked skip")


def test_skip_markers_give_a_reason() -> None:
    for page in doc_pages():
        for m in re.finditer(r"<!--\s*skip\b([^>]*)-->", page.read_text()):
            assert m.group(1).lstrip(":").strip(), f"{page.name}: <!-- skip --> without a reason"


def test_block_extraction() -> None:
    text = (
        "x\n\n<!-- skip: needs a GPU -->\n```python\nraise SystemExit\n```\n\n"
        '=== "tab"\n\n    ```python\n    y = 1\n    ```\n'
    )
    blocks = python_blocks(text)
    assert [(code, skip) for _, code, skip in blocks] == [
        ("raise SystemExit\n", "needs a GPU"),
        ("y = 1\n", None),
    ]


def test_public_api_is_documented_on_the_site() -> None:
    pytest.importorskip("griffe")
    import api_check

    assert api_check.problems() == []


def test_results_include_tolerates_missing_folders(tmp_path: Path) -> None:
    import mkdocs_hooks

    (tmp_path / "results" / "a").mkdir(parents=True)
    (tmp_path / "results" / "a" / "table.md").write_text(
        "# Title\n\n![fig](fig.png) [x](../../y.py)\n"
    )
    (tmp_path / "results" / "a" / "fig.png").write_bytes(b"")
    (tmp_path / "results" / "a" / "other.png").write_bytes(b"")
    page = "intro\n<!-- results: results/a -->\n<!-- results: results/missing -->\n"
    out = mkdocs_hooks.expand_results(page, tmp_path, tmp_path)
    assert "### Title" in out  # headings demoted under the page's own
    assert "![fig](results/a/fig.png)" in out  # links re-rooted at the page
    assert "`../../y.py`" in out  # links leaving the site become plain text
    assert "![other](results/a/other.png)" in out  # figures the Markdown does not show
    assert "Not committed yet" in out


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("mkdocs", "material", "mkdocstrings_handlers")),
    reason='MkDocs Material / mkdocstrings not installed (pip install -e ".[docs]")',
)
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "api" / "index.html").is_file()
