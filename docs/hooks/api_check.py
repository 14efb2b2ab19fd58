"""Checks shared by the docs build (``mkdocs_hooks.py``) and ``tests/docs/test_docs.py``.

Static only (``ast`` + griffe): nothing here imports TRL, verl, AReaL or torch.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: module name -> source file whose ``__all__`` lists the public names the reference must cover
PUBLIC_MODULES = {
    "ess_po": ROOT / "ess_po" / "__init__.py",
    "ess_po.integrations.trl": ROOT / "ess_po" / "integrations" / "trl" / "__init__.py",
    "ess_po.integrations.verl": ROOT / "ess_po" / "integrations" / "verl" / "__init__.py",
    "ess_po.integrations.areal": ROOT / "ess_po" / "integrations" / "areal" / "__init__.py",
    "ess_po.testing.tiny": ROOT / "ess_po" / "testing" / "tiny.py",
    "ess_po.integrations.parallel": ROOT / "ess_po" / "integrations" / "parallel.py",
}
#: core functions and classes whose docstring must show shapes or an example (constants have no
#: shapes; the integrations are looser: their docstrings document framework objects whose shapes
#: belong to TRL/verl)
_SHAPE = re.compile(r"\(\s*[A-Za-z0-9_]+\s*,[^)]*\)|\(\)|0-dim|shape|Example", re.IGNORECASE)


def public_names() -> dict[str, list[str]]:
    """``{module: __all__}`` read from the sources."""
    out = {}
    for module, path in PUBLIC_MODULES.items():
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                    out[module] = list(ast.literal_eval(node.value))
    return out


def api_page_targets(page: Path = ROOT / "docs" / "api.md") -> set[str]:
    """Identifiers of the ``::: identifier`` blocks of the API page."""
    return set(re.findall(r"^::: *([\w.]+)", page.read_text(), flags=re.MULTILINE))


def load_package():
    """``ess_po`` (its subpackages included) as griffe sees it for the docs."""
    import sys

    import griffe

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from griffe_ess import ESSDocs

    return griffe.load(
        "ess_po",
        search_paths=[str(ROOT)],
        docstring_parser="google",
        extensions=griffe.load_extensions(ESSDocs()),
    )


def problems() -> list[str]:
    """Public names that are undocumented, lack shapes/examples (core), or miss the API page."""
    pkg = load_package()
    targets = api_page_targets()
    found = []
    for module, names in public_names().items():
        for name in names:
            path = f"{module}.{name}"
            if path not in targets and module not in targets:
                found.append(f"{path}: no '::: {path}' block in docs/api.md")
            obj = pkg[path.removeprefix("ess_po.")]
            if obj.is_alias:
                obj = obj.final_target
            doc = obj.docstring.value if obj.docstring else ""
            if not doc.strip():
                found.append(f"{path}: no docstring")
            elif module == "ess_po" and not obj.is_attribute and not _SHAPE.search(doc):
                found.append(f"{path}: docstring shows neither shapes nor an example")
    return found
