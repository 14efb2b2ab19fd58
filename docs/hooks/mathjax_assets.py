"""MathJax served with the site, from the npm package (no CDN: the math renders offline).

The build takes ``mathjax@VERSION`` from the npm registry once (``npm pack``, checked against the
registry's sha512 integrity), unpacks it into a cache folder outside the repository and adds the
files the pages need to the site under ``javascripts/mathjax/``: the TeX-to-HTML component, its
web fonts, the TeX extensions it may autoload and MathJax's licence.

* ``ESS_PO_MATHJAX_DIR``: an unpacked ``mathjax`` package to use instead (e.g.
  ``node_modules/mathjax`` after ``npm install mathjax@3``); nothing is fetched then.
* The cache is ``$XDG_CACHE_HOME/ess-po`` (default ``~/.cache/ess-po``).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

VERSION = "3.2.2"
#: ``npm view mathjax@3.2.2 dist.integrity``
INTEGRITY = "sha512-Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw=="
#: where the files land in the site; mkdocs.yml's ``extra_javascript`` names ``ENTRY`` there
SITE_DIR = "javascripts/mathjax"
ENTRY = "tex-chtml.js"
#: what the pages load, relative to the package's ``es5/`` folder (MathJax resolves the fonts
#: and the autoloaded extensions relative to the entry script)
_PATTERNS = ("tex-chtml.js", "output/chtml/fonts/woff-v2/*.woff", "input/tex/extensions/*.js")


class MathJaxUnavailable(RuntimeError):
    """The package is neither cached nor obtainable (no npm, no registry)."""


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ess-po" / f"mathjax-{VERSION}"


def _check_integrity(tarball: Path) -> None:
    algorithm, _, expected = INTEGRITY.partition("-")
    digest = base64.b64encode(hashlib.new(algorithm, tarball.read_bytes()).digest()).decode()
    if digest != expected:
        raise MathJaxUnavailable(
            f"{tarball.name}: {algorithm} {digest} does not match the pinned integrity {expected}."
        )


def fetch(target: Path) -> Path:
    """Download ``mathjax@VERSION`` with npm, check it, unpack it to ``target``; its root."""
    npm = shutil.which("npm")
    if npm is None:
        raise MathJaxUnavailable(
            "npm is not installed; install Node.js/npm, or set ESS_PO_MATHJAX_DIR to an unpacked "
            f"mathjax@{VERSION} package."
        )
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [npm, "pack", f"mathjax@{VERSION}", "--pack-destination", tmp, "--silent"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        tarballs = list(Path(tmp).glob("mathjax-*.tgz"))
        if proc.returncode != 0 or len(tarballs) != 1:
            raise MathJaxUnavailable(f"npm pack mathjax@{VERSION} failed: {proc.stderr.strip()}")
        _check_integrity(tarballs[0])
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(tarballs[0]) as tar:
            tar.extractall(unpacked, filter="data")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
        try:
            shutil.move(unpacked / "package", staging / "package")
            # atomic: a concurrent build sees all of it or none; if one got there first, keep it
            os.rename(staging / "package", target)
        except OSError:
            if not (target / "es5" / ENTRY).is_file():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def package_root() -> Path:
    """The unpacked package: ``ESS_PO_MATHJAX_DIR``, else the cache (fetched if missing)."""
    override = os.environ.get("ESS_PO_MATHJAX_DIR")
    if override:
        root = Path(override)
        if not (root / "es5" / ENTRY).is_file():
            raise MathJaxUnavailable(
                f"ESS_PO_MATHJAX_DIR={override} has no es5/{ENTRY}: point it at an unpacked "
                "mathjax@3 package."
            )
        return root
    root = cache_dir() / "package"
    if not (root / "es5" / ENTRY).is_file():
        fetch(root)
    return root


def site_files(root: Path) -> dict[str, Path]:
    """``{path in the site: file}`` for what the pages need."""
    es5 = root / "es5"
    out = {f"{SITE_DIR}/LICENSE": root / "LICENSE"}
    for pattern in _PATTERNS:
        for path in sorted(es5.glob(pattern)):
            out[f"{SITE_DIR}/{path.relative_to(es5).as_posix()}"] = path
    return out
