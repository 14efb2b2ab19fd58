"""Optional frameworks of a test module: import, skip where absent, fail where required.

An opt-in environment (``.ci/vllm.sh``, ``.ci/areal.sh``) sets an ``ESS_PO_REQUIRE_*`` variable:
there a framework that fails to import is an error, because a skip would hide a broken
environment. Standard library only at import (pytest is imported when a skip is needed).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = ["require"]


def require(module: str, env_var: str, hint: str) -> ModuleType:
    """Import ``module`` for a test module. Where it does not import, skip the whole test module
    with ``hint`` (how to get the environment), unless ``env_var`` is set: then raise the
    ``ImportError``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if os.environ.get(env_var):
            raise ImportError(f"{env_var} is set but {module} does not import: {exc}") from exc
        import pytest

        pytest.skip(hint, allow_module_level=True)
        raise  # unreachable: pytest.skip raises
