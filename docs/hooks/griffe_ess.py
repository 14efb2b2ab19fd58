"""Griffe extension for the API reference (loaded by mkdocstrings, see mkdocs.yml).

* The reference is built by static analysis: the docs build imports neither TRL nor verl.
* Reads Sphinx-style ``#:`` comments above module constants as their docstrings.
* Turns the reStructuredText roles used in the docstrings into Markdown: ``.. math::`` blocks
  and ``:math:`` roles into MathJax (``pymdownx.arithmatex``), ``:func:``/``:class:``/
  ``:meth:``/``:data:`` roles into cross-references (``mkdocs-autorefs``).
* Reads an ``Example:`` heading as the Google-style ``Examples:`` section, so the doctest lines
  render as code (griffe would otherwise make an "example" admonition of them and Markdown
  would read the ``>>>`` prompts as nested quotes).
* Shows a module constant computed from other constants (``tuple(_CORE_MODE)``) by its value,
  evaluated statically from the literal constants of its module.
"""

from __future__ import annotations

import ast
import contextlib
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import griffe

ROOT = Path(__file__).resolve().parents[2]
_ROLE = re.compile(r":(func|class|meth|data|attr|mod|obj):`~?([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_MATH_BLOCK = re.compile(r"^( *)\.\. math::\n\n((?:\1 {2,}.*\n|\n)+)", re.MULTILINE)
_EXAMPLE = re.compile(r"^( *)Example:[ \t]*$", re.MULTILINE)
#: top-level modules a role may name that the reference does not document
_EXTERNAL = set(sys.stdlib_module_names) | {"torch", "trl", "transformers", "verl", "megatron"}
#: what a constant's value may call when it is evaluated for the reference
_SAFE_CALLS = {f.__name__: f for f in (tuple, list, dict, set, frozenset, sorted, len)}


def _math_block(match: re.Match[str]) -> str:
    indent = match.group(1)
    body = textwrap.dedent(match.group(2)).strip("\n")
    if "&" in body or "\\\\" in body:
        body = "\\begin{aligned}\n" + body + "\n\\end{aligned}"
    lines = ["$$", *body.splitlines(), "$$"]
    return "\n".join(indent + line if line else line for line in lines) + "\n\n"


#: modules whose public names the reference documents where their package re-exports them
_REEXPORTED_BY = {
    "ess_po.ess": "ess_po",
    "ess_po.loss": "ess_po",
    "ess_po.objective": "ess_po",
    "ess_po.types": "ess_po",
    "ess_po.integrations.trl.config": "ess_po.integrations.trl",
    "ess_po.integrations.trl.trainer": "ess_po.integrations.trl",
    "ess_po.integrations.verl.losses": "ess_po.integrations.verl",
    "ess_po.integrations.verl.step_scope": "ess_po.integrations.verl",
}


def _resolve(target: str, obj: griffe.Object) -> str:
    """Path of a role target, relative names resolved from the object's module."""
    if target.startswith("ess_po."):
        # ess_po.types.ESSStats -> ess_po.ESSStats: the reference documents the re-exports.
        for module, package in _REEXPORTED_BY.items():
            if target.startswith(module + "."):
                return package + target[len(module) :]
        return target
    module = obj.module.path
    return f"{_REEXPORTED_BY.get(module, module)}.{target}"


def rst_to_markdown(text: str, obj: griffe.Object) -> str:
    """Convert the reStructuredText constructs used in ess-po docstrings to Markdown."""
    text = _MATH_BLOCK.sub(_math_block, text if text.endswith("\n") else text + "\n")
    text = _EXAMPLE.sub(r"\1Examples:", text)
    text = _MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)
    text = _ROLE.sub(lambda m: _crossref(m.group(2), obj), text)
    return text.rstrip("\n")


def _crossref(target: str, obj: griffe.Object) -> str:
    """A link to a documented name; plain code for the standard library and the frameworks,
    which this site does not document (``:data:`sys.modules```)."""
    if target.split(".")[0] in _EXTERNAL:
        return f"`{target}`"
    return f"[`{target.split('.')[-1]}`][{_resolve(target, obj)}]"


def _doc_comment(attr: griffe.Object) -> str | None:
    """The ``#:`` comment lines right above an attribute, if any."""
    if attr.lineno is None or not attr.filepath or isinstance(attr.filepath, list):
        return None
    lines = Path(attr.filepath).read_text().splitlines()
    found: list[str] = []
    i = attr.lineno - 2
    while i >= 0 and lines[i].lstrip().startswith("#:"):
        found.insert(0, lines[i].lstrip()[2:].strip())
        i -= 1
    return " ".join(found) or None


def _literal(value: object) -> object:
    return ast.literal_eval(str(value))


def show_computed_values(module: griffe.Module) -> None:
    """Replace a constant's expression by its value where the module's literals determine it."""
    attributes = [
        m for m in module.members.values() if not m.is_alias and m.is_attribute and m.value
    ]
    namespace: dict[str, object] = {}
    for attr in attributes:
        with contextlib.suppress(ValueError, SyntaxError, TypeError):
            namespace[attr.name] = _literal(attr.value)
    for attr in attributes:
        if attr.name in namespace:
            continue
        try:
            value = eval(str(attr.value), {"__builtins__": _SAFE_CALLS}, dict(namespace))
        except Exception:  # not computable statically: keep the expression
            continue
        if isinstance(value, str | int | float | bool | tuple | list | frozenset | set | dict):
            attr.value = repr(value)
    for sub in module.modules.values():
        show_computed_values(sub)


class ESSDocs(griffe.Extension):
    """See the module docstring."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        show_computed_values(pkg)

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.is_attribute and obj.docstring is None:
            comment = _doc_comment(obj)
            if comment:
                obj.docstring = griffe.Docstring(comment, parent=obj)
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value, obj)
