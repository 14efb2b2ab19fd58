"""verl and TRL in one environment (issue 10, item 6).

verl 0.9.1's FSDP engine calls ``apply_monkey_patch`` when it builds the actor model; whenever
``trl`` is importable that function imports ``AutoModelForCausalLMWithValueHead`` from ``trl``,
which TRL 1.16 no longer has. The tests run verl's own function in two fresh interpreters, one
with the installed trl and one where trl is invisible (``sys.modules["trl"] = None``, which is
what ``importlib.util.find_spec`` - verl's check - reports for an uninstalled package), and check
that the plugin warns exactly in the first case: not at ``import verl`` (which must not import
trl, about 1 s), but where the step-scope worker starts, before verl builds the model.

Mutation checked: making ``trl_conflict`` return None unconditionally fails
``test_plugin_warns_where_verl_actor_cannot_start``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ess_po.testing.processes import child_env

pytest.importorskip("verl")
pytest.importorskip("trl")

REPO = Path(__file__).resolve().parents[2]

_PROBE = """
    import json, sys, warnings
    if sys.argv[1] == "hidden":
        sys.modules["trl"] = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import verl  # loads the ess-po plugin through the verl.plugins entry point
        from verl.trainer.ppo.core_algos import get_policy_loss_fn
    at_import = [str(w.message) for w in caught if str(w.message).startswith("ess-po: trl")]
    trl_imported = sys.modules.get("trl") is not None
    get_policy_loss_fn("ess")
    # The step-scope worker checks where the actor starts, before verl builds the model (here
    # verl's own constructor is replaced by one that stops at once).
    from verl.workers import engine_workers
    from ess_po.integrations.verl import enable_step_scope
    enable_step_scope()
    def model_build(self, *args, **kwargs):
        raise RuntimeError("model build")
    engine_workers.TrainingWorker.__init__ = model_build
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            engine_workers.ActorRolloutRefWorker.actor_worker_cls(None)
        except RuntimeError:
            pass
    ours = [str(w.message) for w in caught if str(w.message).startswith("ess-po: trl")]
    from ess_po.testing.tiny import build_tiny_model, build_tiny_tokenizer
    from verl.models.transformers.monkey_patch import apply_monkey_patch
    model = build_tiny_model(build_tiny_tokenizer(), hidden_size=16, num_layers=1, num_heads=2)
    try:
        apply_monkey_patch(model=model, use_remove_padding=True)
        error = None
    except ImportError as exc:
        error = str(exc)
    print(json.dumps({"warnings": ours, "error": error, "at_import": at_import,
                      "trl_imported": trl_imported}))
"""


@pytest.fixture(scope="module")
def probes() -> dict[str, dict]:
    env = child_env()
    procs = {
        case: subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_PROBE), case],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for case in ("installed", "hidden")
    }
    out = {}
    for case, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        out[case] = json.loads(stdout.strip().splitlines()[-1])
    return out


def _trl_lacks_value_head() -> bool:
    import importlib

    import trl

    try:
        importlib.import_module("trl.experimental.ppo")
        return False
    except ImportError:
        return not hasattr(trl, "AutoModelForCausalLMWithValueHead")


@pytest.mark.slow
@pytest.mark.skipif(not _trl_lacks_value_head(), reason="this trl still has the value-head class")
def test_verl_fsdp_model_patch_fails_next_to_this_trl(probes: dict[str, dict]) -> None:
    """verl's ``apply_monkey_patch`` (called by its FSDP engine on every actor build) raises
    ImportError next to the installed trl, and works when trl is not importable."""
    assert "AutoModelForCausalLMWithValueHead" in probes["installed"]["error"]
    assert probes["hidden"]["error"] is None


@pytest.mark.slow
@pytest.mark.skipif(not _trl_lacks_value_head(), reason="this trl still has the value-head class")
def test_plugin_warns_where_verl_actor_cannot_start(probes: dict[str, dict]) -> None:
    """The step-scope worker warns (once, naming the fix) before verl builds the model, exactly
    when verl's actor cannot start; the loss is registered either way."""
    (message,) = probes["installed"]["warnings"]
    assert "pip uninstall trl" in message and "AutoModelForCausalLMWithValueHead" in message
    assert probes["hidden"]["warnings"] == []


@pytest.mark.slow
def test_import_verl_does_not_import_trl(probes: dict[str, dict]) -> None:
    """Loading the plugin (``import verl``) neither imports trl nor warns."""
    for case in ("installed", "hidden"):
        assert probes[case]["trl_imported"] is False
        assert probes[case]["at_import"] == []
