"""MkDocs hooks (see ``hooks:`` in mkdocs.yml).

* Fail the build (a warning, fatal under ``--strict``) when a public name of ``ess_po`` or of
  the integrations is undocumented or missing from the API page (``api_check.problems``).
* Expand ``<!-- results: FOLDER -->`` markers: every ``*.md`` file under ``docs/FOLDER`` is
  inlined (headings demoted, relative links re-rooted), and PNGs it does not show are appended.
  A folder that does not exist yet becomes a short note, so pages can announce results that
  another job commits later without breaking the build.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import api_check

log = logging.getLogger("mkdocs.hooks.ess_po")
_MARKER = re.compile(r"^<!-- results: ([\w./-]+) -->$", re.MULTILINE)
_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")


def on_pre_build(config, **kwargs) -> None:
    for problem in api_check.problems():
        log.warning("API reference: %s", problem)


def _rebase(text: str, folder: Path, docs_dir: Path, page_dir: Path) -> str:
    def fix(m: re.Match[str]) -> str:
        target = m.group(2)
        if re.match(r"^[a-z]+:|^#|^/", target):
            return m.group(0)
        resolved = (folder / target.split("#")[0]).resolve()
        if not resolved.exists() or docs_dir not in resolved.parents:
            return f"`{target}`"  # outside the site: keep the name, drop the link
        rel = resolved.relative_to(docs_dir)
        depth = len(page_dir.relative_to(docs_dir).parts)
        return m.group(1) + "../" * depth + rel.as_posix() + m.group(3)

    return _LINK.sub(fix, text)


def expand_results(markdown: str, docs_dir: Path, page_dir: Path) -> str:
    """Replace each results marker by the folder's Markdown and figures."""

    def expand(m: re.Match[str]) -> str:
        folder = (docs_dir / m.group(1)).resolve()
        shown_name = folder.relative_to(docs_dir.parent).as_posix()
        mds = sorted(folder.glob("*.md")) if folder.is_dir() else []
        # figures can only be shown from inside the site
        inside = docs_dir in folder.parents
        pngs = sorted(folder.glob("*.png")) if folder.is_dir() and inside else []
        if not mds and not pngs:
            return (
                f'!!! note "Not committed yet"\n    `{shown_name}/` holds no results yet; '
                "they appear here once the run that produces them is committed.\n"
            )
        parts = []
        for md in mds:
            text = md.read_text()
            text = re.sub(
                r"^(#{1,4}) ", lambda h: "#" * (len(h.group(1)) + 2) + " ", text, flags=re.M
            )
            source = md.relative_to(docs_dir.parent).as_posix()
            parts.append(_rebase(text, folder, docs_dir, page_dir) + f"\n\n*Source: `{source}`*")
        shown = "\n".join(parts)
        for png in pngs:
            if png.name not in shown:
                rel = png.relative_to(docs_dir).as_posix()
                depth = len(page_dir.relative_to(docs_dir).parts)
                parts.append(f"![{png.stem}]({'../' * depth}{rel})")
        return "\n\n".join(parts)

    return _MARKER.sub(expand, markdown)


def on_page_markdown(markdown, page, config, files, **kwargs):
    if "<!-- results:" not in markdown:
        return markdown
    docs_dir = Path(config["docs_dir"]).resolve()
    page_dir = (docs_dir / page.file.src_uri).parent
    return expand_results(markdown, docs_dir, page_dir)
