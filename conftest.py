"""Doctest collection of ``ess_po/`` (``--doctest-modules``): an adapter or fixture module whose
framework is not installed is not collected. Importing such a module imports its framework, and
the version-matrix cell (.ci/matrix.sh) has no verl."""

from __future__ import annotations

import importlib.util

_NEEDS = {
    "ess_po/integrations/verl/*": "verl",
    "ess_po/testing/verl_harness.py": "verl",
    "ess_po/integrations/trl/*": "trl",
    "ess_po/integrations/areal/*": "areal",
    "ess_po/testing/areal_async.py": "areal",
    "ess_po/testing/areal_engine.py": "areal",
    "ess_po/testing/tiny.py": "tokenizers",
}

collect_ignore_glob = [
    path for path, module in _NEEDS.items() if not importlib.util.find_spec(module)
]
