"""verl 0.9.1's FSDP actor next to TRL: a check run where the actor starts, never at import.

verl's FSDP engine calls ``verl.models.transformers.monkey_patch.apply_monkey_patch`` when it
builds the model; whenever ``trl`` is importable, that function imports
``AutoModelForCausalLMWithValueHead`` from ``trl.experimental.ppo``, else from ``trl``. TRL
releases without that class (1.16, the version the ``trl`` extra pins) make the actor fail with
``ImportError``.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings


def trl_conflict() -> str | None:
    """Why verl's FSDP actor cannot start next to the installed ``trl``, or None.

    Reproduces verl's two imports: importing ``trl`` costs about 1 s, only where it is installed.
    """
    try:
        if importlib.util.find_spec("trl") is None:
            return None
    except (ImportError, ValueError):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental warns on import
        for module in ("trl.experimental.ppo", "trl"):
            try:
                if hasattr(importlib.import_module(module), "AutoModelForCausalLMWithValueHead"):
                    return None
            except ImportError:
                continue
    from importlib.metadata import PackageNotFoundError, version

    try:
        trl_version = version("trl")
    except PackageNotFoundError:
        trl_version = "?"
    return (
        f"ess-po: trl {trl_version} is installed next to verl, and verl's FSDP actor will fail "
        "with ImportError when it builds the model: verl's apply_monkey_patch imports "
        "AutoModelForCausalLMWithValueHead from trl whenever trl is importable, and this trl "
        "has no such class. Run verl in an environment without trl (`pip uninstall trl`; the "
        "verl extra of ess-po does not need it) and TRL training in a separate environment."
    )


def warn_on_trl_conflict() -> None:
    """Emit :func:`trl_conflict`'s message as a ``RuntimeWarning``, if there is one."""
    message = trl_conflict()
    if message is not None:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
