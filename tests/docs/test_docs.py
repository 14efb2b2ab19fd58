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

import ast
import contextlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def docs_module(name: str) -> ModuleType:
    """``docs/hooks/NAME.py`` or ``docs/scripts/NAME.py``, loaded by path under its own name.

    The sibling modules it imports (``mkdocs_hooks`` imports ``api_check``) are loaded first and
    registered in ``sys.modules``, as MkDocs does for its hooks; nothing is added to the import path.
    """
    if name in sys.modules:
        return sys.modules[name]
    path = next(
        p for p in (DOCS / "hooks" / f"{name}.py", DOCS / "scripts" / f"{name}.py") if p.is_file()
    )
    siblings = {p.stem for p in path.parent.glob("*.py")} - {name}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported = [node.module]
        else:
            continue
        for sibling in set(imported) & siblings:
            with contextlib.suppress(ModuleNotFoundError):  # a lazy import's own dependency
                docs_module(sibling)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


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
    api_check = docs_module("api_check")

    assert api_check.problems() == []


def test_results_include_tolerates_missing_folders(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")  # the hooks import MkDocs (docs extra)
    mkdocs_hooks = docs_module("mkdocs_hooks")

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


def test_results_show_figures_the_text_only_names(tmp_path: Path) -> None:
    """A figure named in code (`x.png`) is still shown, after the headline section, with the
    text's description as caption; the setup moves below the headline; repeated titles get
    the file's qualifier (the off-policy page showed no plot; two identical headings)."""
    pytest.importorskip("mkdocs")  # the hooks import MkDocs (docs extra)
    mkdocs_hooks = docs_module("mkdocs_hooks")

    folder = tmp_path / "results" / "study"
    folder.mkdir(parents=True)
    setup = "Command: `python study.py`. " + "Setup details. " * 40
    (folder / "results.md").write_text(
        f"# Study\n\n{setup}\n\n## Summary\n\n| a | b |\n|---|---|\n| x | 1 |\n\n"
        "## More\n\nmore text\n\nPlots: `curves.png` (reward per step), `final.png`.\n"
    )
    (folder / "study.md").write_text("# Cost\n\nfull grid\n")
    (folder / "study_quick.md").write_text("# Cost\n\nquick\n")
    for name in ("final.png", "curves.png"):
        (folder / name).write_bytes(b"")
    out = mkdocs_hooks.expand_results("<!-- results: results/study -->", tmp_path, tmp_path)
    assert "![reward per step](results/study/curves.png)" in out
    assert "<figcaption>curves.png: reward per step</figcaption>" in out
    assert "![final](results/study/final.png)" in out
    # headline first: summary, then the figures in the order the text names them, then setup
    order = [out.index(s) for s in ("#### Summary", "curves.png)", "final.png)", "Setup details")]
    assert order == sorted(order)
    assert out.index("Setup details") < out.index("#### More")
    assert '??? info "How this was run"' in out
    assert "### Cost (quick)" in out and "### Cost (full)" in out
    assert out.index("### Cost (quick)") < out.index("### Cost (full)")  # short file first


def _table_lines(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()]


def test_wide_tables_are_reshaped() -> None:
    pytest.importorskip("mkdocs")  # the hooks import MkDocs (docs extra)
    mkdocs_hooks = docs_module("mkdocs_hooks")

    header = ["condition", *[f"m{i}" for i in range(10)]]
    rows = [[f"c{r}", *[f"0.{r}{i} ± 0.01" for i in range(10)]] for r in range(3)]
    # few rows: transposed, every cell kept
    out = _table_lines(mkdocs_hooks.reshape_table(header, rows, max_columns=7))
    assert out[0] == ["condition", "c0", "c1", "c2"]
    assert out[2] == ["m0", "0.00 ± 0.01", "0.10 ± 0.01", "0.20 ± 0.01"]
    assert len(out) == 2 + 10
    # leading label columns (8x1024 is a label, 1.0 MiB a measurement) lifted into captions
    header = ["B x T", "dtype", "method", "fwd", "bwd", "ratio", "mem", "x", "y"]
    rows = [
        [bt, dt, m, "0.1 (0.01)", "0.2 (0.02)", "1.00", "1.0 MiB", "1", "2"]
        for bt in ("8x1024", "64x4096")
        for dt in ("float32", "bfloat16")
        for m in ("ess", "clipped", "cispo", "reinforce", "direct", "x", "y", "z", "w")
    ]
    text = mkdocs_hooks.reshape_table(header, rows, max_columns=7)
    assert "**B x T 8x1024, dtype bfloat16**" in text
    assert text.count("| method | fwd | bwd | ratio | mem | x | y |") == 4
    assert text.count("| ess |") == 4
    # many rows, no label columns to lift: split into tables repeating the first column
    rows = [[f"r{i}", *[str(j) for j in range(10)]] for i in range(12)]
    text = mkdocs_hooks.reshape_table(["k", *[f"h{j}" for j in range(10)]], rows, max_columns=7)
    assert text.count("| k | h0 |") == 1 and text.count("| k | h6 |") == 1
    assert text.count("| r11 |") == 2
    # narrow tables are left alone
    assert (
        mkdocs_hooks.reshape_table(["a", "b"], [["1", "2"]])
        == "| a | b |\n| --- | --- |\n| 1 | 2 |"
    )


def _fake_mathjax(root: Path) -> Path:
    for rel in (
        "LICENSE",
        "es5/tex-chtml.js",
        "es5/tex-svg.js",
        "es5/output/chtml/fonts/woff-v2/MathJax_Zero.woff",
        "es5/input/tex/extensions/ams.js",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    return root


def test_mathjax_files_for_the_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mathjax_assets = docs_module("mathjax_assets")

    root = _fake_mathjax(tmp_path / "mathjax")
    monkeypatch.setenv("ESS_PO_MATHJAX_DIR", str(root))
    assert mathjax_assets.package_root() == root
    files = mathjax_assets.site_files(root)
    assert set(files) == {
        "javascripts/mathjax/LICENSE",
        "javascripts/mathjax/tex-chtml.js",
        "javascripts/mathjax/output/chtml/fonts/woff-v2/MathJax_Zero.woff",
        "javascripts/mathjax/input/tex/extensions/ams.js",
    }  # what the pages load, laid out as MathJax resolves it from the entry script
    mkdocs_yml = (ROOT / "mkdocs.yml").read_text()
    assert f"{mathjax_assets.SITE_DIR}/{mathjax_assets.ENTRY}" in mkdocs_yml
    assert "https://" not in mkdocs_yml.split("extra_javascript:")[1].split("\n\n")[0]  # no CDN
    monkeypatch.setenv("ESS_PO_MATHJAX_DIR", str(tmp_path))
    with pytest.raises(mathjax_assets.MathJaxUnavailable, match="ESS_PO_MATHJAX_DIR"):
        mathjax_assets.package_root()


def test_mathjax_tarball_integrity_is_checked(tmp_path: Path) -> None:
    mathjax_assets = docs_module("mathjax_assets")

    tarball = tmp_path / "mathjax-3.2.2.tgz"
    tarball.write_bytes(b"not the package")
    with pytest.raises(mathjax_assets.MathJaxUnavailable, match="does not match"):
        mathjax_assets._check_integrity(tarball)


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js not installed")
@pytest.mark.parametrize("mathjax", ["absent", "config only", "loaded"])
def test_mathjax_startup_script_never_throws(mathjax: str) -> None:
    """docs/javascripts/mathjax.js under Material's ``document$``: no error when MathJax is
    missing or not loaded yet, no reset of the first page (that blanked the math), a reset and
    typeset on later pages. Mutation: dropping the ``firstPage`` guard fails "loaded"."""
    script = (DOCS / "javascripts" / "mathjax.js").read_text()
    setup = {
        "absent": "",
        "config only": "",
        "loaded": "const calls = []; const fake = {startup: {output: {clearCache: () => "
        "calls.push('clear')}}, typesetClear: () => calls.push('tc'), texReset: () => "
        "calls.push('reset'), typesetPromise: () => calls.push('typeset')};",
    }[mathjax]
    after = {
        "absent": "delete window.MathJax; emit(); emit();",
        "config only": "emit(); emit();",
        "loaded": "Object.assign(window.MathJax, fake); emit();"
        "if (calls.length) throw new Error('first page reset: ' + calls);"
        "emit(); if (calls.join() !== 'clear,tc,reset,typeset') throw new Error(calls.join());",
    }[mathjax]
    program = (
        "const window = globalThis; const subs = [];"
        "const document$ = {subscribe: f => subs.push(f)};"
        "const emit = () => subs.forEach(f => f());" + setup + script + after
    )
    proc = subprocess.run(["node", "-e", program], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_examples_render_as_code_and_constants_by_value() -> None:
    """The docstrings' ``Example:`` becomes griffe's Examples section (code, not quotes); a
    constant computed from others shows its value."""
    pytest.importorskip("griffe")
    api_check = docs_module("api_check")

    package = api_check.load_package()
    for name in ("ess_policy_loss", "effective_sample_size", "ess_stats"):
        sections = package[name].docstring.parsed
        kinds = [section.kind.value for section in sections]
        assert "examples" in kinds and "admonition" not in kinds, (name, kinds)
    value = str(package["integrations.verl.VERL_LOSS_AGG_MODES"].value)
    losses = ast.parse((ROOT / "ess_po" / "integrations" / "verl" / "losses.py").read_text())
    (assigned,) = (
        node.value
        for node in losses.body
        if isinstance(node, ast.AnnAssign | ast.Assign)
        and "VERL_LOSS_AGG_MODES"
        in ast.unparse(node.target if isinstance(node, ast.AnnAssign) else node.targets[0])
    )
    assert ast.literal_eval(value) == ast.literal_eval(assigned)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="apt-get install chromium")
def test_browser_check_catches_what_a_reader_would_meet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/scripts/browser_check.py on a two-page site: the clean page passes, the other
    fails on each of the four things it checks (each line below is one check)."""
    browser_check = docs_module("browser_check")

    site = tmp_path / "site"
    (site / "bad").mkdir(parents=True)
    (site / "results").mkdir()
    png = DOCS / "results" / "metrics" / "weights.png"
    shutil.copy(png, site / "fig.png")
    shutil.copy(png, site / "results" / "curves.png")
    head = '<head><link rel="icon" href="data:,"></head>'  # no favicon request
    (site / "index.html").write_text(
        f'<html>{head}<body><div class="md-content"><p>fine</p><img src="fig.png"></div></body>'
        "</html>"
    )
    (site / "bad" / "index.html").write_text(
        f'<html>{head}<body><div class="md-content"><p>math \\(x^2\\) left raw</p>'
        '<p>see <code>curves.png</code></p><img src="missing.png"></div>'
        '<script>console.error("boom")</script></body></html>'
    )
    code = browser_check.main([str(site), "--screenshots", str(tmp_path / "shots")])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "ok   / " in out and "FAIL /bad/" in out, out
    assert "console.error: boom" in out  # console error
    assert "raw TeX in the text" in out and "x^2" in out  # raw TeX
    assert "image did not load: missing.png" in out  # naturalWidth 0 (also logs a 404)
    assert "names curves.png (a results image) but does not show it" in out
    assert (tmp_path / "shots" / "home.png").stat().st_size > 1000  # a real screenshot


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("mkdocs", "material", "mkdocstrings_handlers")),
    reason='MkDocs Material / mkdocstrings not installed (pip install -e ".[docs]")',
)
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    mathjax_assets = docs_module("mathjax_assets")

    if not (
        os.environ.get("ESS_PO_MATHJAX_DIR")
        or (mathjax_assets.cache_dir() / "package").is_dir()
        or shutil.which("npm")
    ):
        pytest.skip("MathJax is neither cached nor obtainable: install Node.js/npm")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "api" / "index.html").is_file()
    # MathJax is served with the site, and no page loads anything from elsewhere
    assert (tmp_path / "javascripts" / "mathjax" / "tex-chtml.js").stat().st_size > 100_000
    pages = {p: p.read_text() for p in tmp_path.rglob("*.html")}
    for page, html in pages.items():
        assert not re.search(r"<script[^>]+src=\"https?:", html), page
    # every committed figure of a results folder is shown on the page that inlines the folder
    benchmarks = pages[tmp_path / "benchmarks" / "index.html"]
    for marker in re.findall(r"<!-- results: ([\w./-]+) -->", (DOCS / "benchmarks.md").read_text()):
        for png in sorted((DOCS / marker).glob("*.png")):
            assert f'src="../{marker}/{png.name}"' in benchmarks, png
    # one table of contents holds no two identical headings
    headings = re.findall(r"<h[2-5] id=\"[^\"]*\">(.*?)<a class=\"headerlink\"", benchmarks)
    assert headings and len(headings) == len(set(headings)), headings
