"""MkDocs hooks (see ``hooks:`` in mkdocs.yml).

* Fail the build (a warning, fatal under ``--strict``) when a public name of ``ess_po`` or of
  the integrations is undocumented or missing from the API page (``api_check.problems``).
* Add MathJax, from the npm package, to the site (``mathjax_assets``): no CDN.
* Expand ``<!-- results: FOLDER -->`` markers: every ``*.md`` file under ``docs/FOLDER`` is
  inlined, laid out for reading (``expand_results``): headline section first, then the figures
  of the folder (every PNG, whether or not the text names it), then how the run was made and the
  remaining tables; tables too wide for the column are reshaped (``reshape_table``); headings are
  demoted and made unique, relative links re-rooted. A folder that does not exist yet becomes a
  short note, so pages can announce results that another job commits later.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import api_check
import mathjax_assets

log = logging.getLogger("mkdocs.hooks.ess_po")
_MARKER = re.compile(r"^<!-- results: ([\w./-]+) -->$", re.MULTILINE)
_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")
_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
#: a table wider than this is reshaped (about what fits the content column at 1280 px)
MAX_COLUMNS = 8
#: a results table longer than this is folded (the figure and the summary come first)
FOLD_ROWS = 30
#: a preamble longer than this (setup, command, environment) moves below the headline section
LONG_PREAMBLE = 400


def on_pre_build(config, **kwargs) -> None:
    for problem in api_check.problems():
        log.warning("API reference: %s", problem)


def on_files(files, config, **kwargs):
    from mkdocs.structure.files import File  # here: the layout functions need no MkDocs

    try:
        root = mathjax_assets.package_root()
    except (mathjax_assets.MathJaxUnavailable, OSError) as err:
        log.warning("MathJax (the math of every page) is not available: %s", err)
        return files
    for uri, path in mathjax_assets.site_files(root).items():
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def _rebase(text: str, folder: Path, docs_dir: Path, page_dir: Path) -> str:
    def fix(m: re.Match[str]) -> str:
        target = m.group(2)
        if re.match(r"^[a-z]+:|^#|^/", target):
            return m.group(0)
        resolved = (folder / target.split("#")[0]).resolve()
        if not resolved.exists() or docs_dir not in resolved.parents:
            return f"`{target}`"  # outside the site: keep the name, drop the link
        return m.group(1) + _site_path(resolved, docs_dir, page_dir) + m.group(3)

    return _LINK.sub(fix, text)


def _site_path(path: Path, docs_dir: Path, page_dir: Path) -> str:
    depth = len(page_dir.relative_to(docs_dir).parts)
    return "../" * depth + path.relative_to(docs_dir).as_posix()


# --- tables -------------------------------------------------------------------------------------


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _is_key(values: list[str]) -> bool:
    """A label column (``8x1024``, ``float32``, a method), not a measurement: no cell is a number,
    alone or followed by a space (``0.5``, ``1.0 MiB``, ``0.083 (0.014)``, ``0.76 ± 0.02``)."""
    return not any(re.match(r"[-+]?(\d+\.?\d*|\.\d+)(\s|$)", v) for v in values)


def reshape_table(header: list[str], rows: list[list[str]], max_columns: int = MAX_COLUMNS) -> str:
    """A Markdown table that fits the column, with the same cells.

    * Few rows (fewer than the columns): transposed, so the long axis runs down the page.
    * Leading label columns (e.g. ``B x T``, ``dtype``) are lifted into a caption above one
      table per value, until the table is narrow enough; a column with one value becomes part
      of the caption of the single table.
    * Otherwise the columns are split over several tables that repeat the first column.
    """
    width = len(header)
    if width <= max_columns or not rows:
        return _table(header, rows)
    if len(rows) + 1 < width:
        transposed = [[header[i]] + [r[i] for r in rows] for i in range(1, width)]
        if len(rows) + 1 <= max_columns:
            return _table([header[0]] + [r[0] for r in rows], transposed)
    columns = [[r[i] for r in rows] for i in range(width)]
    lift = 0
    while width - lift > max_columns and lift < width - 2 and _is_key(columns[lift]):
        lift += 1
    if lift and len({tuple(r[:lift]) for r in rows}) < len(rows):
        groups: dict[tuple[str, ...], list[list[str]]] = {}
        for r in rows:
            groups.setdefault(tuple(r[:lift]), []).append(r[lift:])
        parts = []
        for key, group in groups.items():
            caption = ", ".join(f"{h} {v}" for h, v in zip(header[:lift], key, strict=True))
            parts.append(f"**{caption}**\n\n" + _table(header[lift:], group))
        return "\n\n".join(parts)
    step = max_columns - 1
    parts = []
    for start in range(1, width, step):
        cols = [0, *range(start, min(start + step, width))]
        parts.append(_table([header[i] for i in cols], [[r[i] for i in cols] for r in rows]))
    return "\n\n".join(parts)


def reshape_tables(text: str, max_columns: int = MAX_COLUMNS) -> tuple[str, int]:
    """Reshape every Markdown table of ``text``; also returns the longest table's row count."""
    lines = text.split("\n")
    out: list[str] = []
    longest = 0
    i = 0
    while i < len(lines):
        is_table = (
            lines[i].lstrip().startswith("|")
            and i + 1 < len(lines)
            and re.fullmatch(r"\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*", lines[i + 1])
        )
        if not is_table:
            out.append(lines[i])
            i += 1
            continue
        header = _cells(lines[i])
        j = i + 2
        rows = []
        while j < len(lines) and lines[j].lstrip().startswith("|"):
            row = _cells(lines[j])
            rows.append((row + [""] * len(header))[: len(header)])
            j += 1
        longest = max(longest, len(rows))
        out.append(reshape_table(header, rows, max_columns))
        i = j
    return "\n".join(out), longest


# --- results folders ----------------------------------------------------------------------------


def _split_sections(text: str) -> tuple[str | None, str, list[str]]:
    """``(title, preamble, sections)`` of a results file (sections start at ``## `` headings)."""
    title = None
    m = re.match(r"\s*# (.+)\n", text)
    if m:
        title, text = m.group(1).strip(), text[m.end() :]
    chunks = re.split(r"(?m)^(?=## )", text)
    return title, chunks[0].strip(), [c.strip() for c in chunks[1:]]


def _indent(text: str) -> str:
    return "\n".join("    " + line if line else "" for line in text.split("\n"))


def _fold(title: str, text: str) -> str:
    return f'??? info "{title}"\n\n{_indent(text)}\n'


def _caption(name: str, text: str) -> str:
    """The description that follows a figure's name in the text, e.g. ``x.png` (what it shows)``
    ("" when there is none: the figure's own title says what it is)."""
    m = re.search(re.escape(name) + r"`?\s*\(([^()]*(?:\([^()]*\)[^()]*)*)\)", text)
    return m.group(1).strip() if m else ""


def _figure(png: Path, caption: str, docs_dir: Path, page_dir: Path) -> str:
    src = _site_path(png, docs_dir, page_dir)
    alt = caption or png.stem.replace("_", " ")
    below = f"\n  <figcaption>{png.name}: {caption}</figcaption>" if caption else ""
    return f'<figure class="ess-figure" markdown="span">\n  ![{alt}]({src}){below}\n</figure>'


def _demote(text: str) -> str:
    return re.sub(r"^(#{1,4}) ", lambda h: "#" * (len(h.group(1)) + 2) + " ", text, flags=re.M)


def _split_at_table(text: str) -> tuple[str, str]:
    m = re.search(r"(?m)^\|", text)
    return (text, "") if m is None else (text[: m.start()], text[m.start() :])


def _shape(part: str, *, fold: bool) -> str:
    """A part of a results file with its tables reshaped; folded when long and ``fold``."""
    lead, tail = _split_at_table(_demote(part))
    shaped, longest = reshape_tables(tail)
    if fold and longest > FOLD_ROWS:
        shaped = _fold(f"Full table ({longest} rows)", shaped)
    return lead.rstrip() + "\n\n" + shaped if lead.strip() else shaped


def _layout(md: Path, title: str | None, figures: list[str], docs_dir: Path, page_dir: Path) -> str:
    """One results file laid out for reading (see the module docstring)."""
    text = _rebase(md.read_text(), md.parent, docs_dir, page_dir)
    _, preamble, sections = _split_sections(text)
    parts = [_demote(f"# {title}")] if title else []
    if sections and len(preamble) > LONG_PREAMBLE:
        # headline first: the first section, the figures, then how the numbers were made
        parts += [_shape(sections[0], fold=False), *figures]
        parts.append(_fold("How this was run", _demote(preamble)))
        rest = sections[1:]
    else:
        lead, tail = _split_at_table(preamble)
        parts += [lead, *figures, _shape(tail, fold=True)]
        rest = sections
    parts += [_shape(section, fold=True) for section in rest]
    text = "\n\n".join(p.strip("\n") for p in parts if p.strip())
    return text + f"\n\n*Source: `{md.relative_to(docs_dir.parent).as_posix()}`*"


def _titles(mds: list[Path], folder: Path) -> list[str | None]:
    """The files' titles, a repeated one qualified by the file name (``loss_cost_quick`` ->
    ``(quick)``): one table of contents holds no two identical headings."""
    titles = [_split_sections(md.read_text())[0] for md in mds]
    out: list[str | None] = []
    for md, title in zip(mds, titles, strict=True):
        if title is not None and titles.count(title) > 1:
            qualifier = md.stem.replace(folder.name, "").strip("_-. ").replace("_", " ")
            out.append(f"{title} ({qualifier or 'full'})")
        else:
            out.append(title)
    return out


_HEADING = re.compile(r"^(#{2,6}) (.+?)\s*$", re.MULTILINE)


def _unique_headings(text: str, seen: set[str], qualifier: str) -> str:
    """Qualify a heading already used on the page with the results folder's name (several
    folders of one study share file names and section titles)."""

    def rename(m: re.Match[str]) -> str:
        title = m.group(2)
        if title in seen:
            title = f"{title} ({qualifier})"
        seen.add(title)
        return f"{m.group(1)} {title}"

    return _HEADING.sub(rename, text)


def expand_results(markdown: str, docs_dir: Path, page_dir: Path) -> str:
    """Replace each results marker by the folder's Markdown and figures."""
    seen = {m.group(2) for m in _HEADING.finditer(_MARKER.sub("", markdown))}

    def expand(m: re.Match[str]) -> str:
        folder = (docs_dir / m.group(1)).resolve()
        shown_name = folder.relative_to(docs_dir.parent).as_posix()
        # the short summary before the long grid
        mds = sorted(folder.glob("*.md"), key=lambda p: (p.stat().st_size, p.name))
        mds = mds if folder.is_dir() else []
        # figures can only be shown from inside the site
        inside = docs_dir in folder.parents
        pngs = sorted(folder.glob("*.png")) if folder.is_dir() and inside else []
        if not mds and not pngs:
            return (
                f'!!! note "Not committed yet"\n    `{shown_name}/` holds no results yet; '
                "they appear here once the run that produces them is committed.\n"
            )
        texts = {md: md.read_text() for md in mds}
        shown = {Path(src).name for t in texts.values() for src in _IMAGE.findall(t)}
        figures: dict[Path | None, list[tuple[int, str]]] = {}
        for png in pngs:
            if png.name in shown:
                continue
            # with the file of the same name, else with the file that names it, else at the end;
            # in the order the text names them
            owner = next((md for md in mds if md.stem == png.stem), None) or next(
                (md for md in mds if png.name in texts[md]), None
            )
            text = texts[owner] if owner else ""
            position = text.find(png.name) % (len(text) + 1)  # not named: last
            figure = _figure(png, _caption(png.name, text), docs_dir, page_dir)
            figures.setdefault(owner, []).append((position, figure))
        ordered = {k: [f for _, f in sorted(v, key=lambda x: x[0])] for k, v in figures.items()}
        parts = [
            _layout(md, title, ordered.get(md, []), docs_dir, page_dir)
            for md, title in zip(mds, _titles(mds, folder), strict=True)
        ]
        parts += ordered.get(None, [])
        return _unique_headings("\n\n".join(parts), seen, folder.name.replace("_", " "))

    return _MARKER.sub(expand, markdown)


def on_page_markdown(markdown, page, config, files, **kwargs):
    if "<!-- results:" not in markdown:
        return markdown
    docs_dir = Path(config["docs_dir"]).resolve()
    page_dir = (docs_dir / page.file.src_uri).parent
    return expand_results(markdown, docs_dir, page_dir)
