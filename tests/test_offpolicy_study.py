"""Smoke test of benchmarks/offpolicy_study.py: a couple of RL steps per cell, finite outputs."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("datasets")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import offpolicy_study as study

CFG = dataclasses.replace(
    study.StudyConfig(),
    steps=2,
    eval_every=1,
    eval_prompts=8,
    warm_steps=2,
    warm_batch=8,
    prompts_per_step=2,
    group_size=4,
)


@pytest.fixture(scope="module")
def init_state():
    return study.warm_start_state(CFG, seed=0)


def _check_run(run, steps: int) -> None:
    assert run["eval_steps"] == list(range(steps + 1))
    for key in ("eval_reward", "batch_reward", "ess", "ess_min", "kl"):
        assert all(math.isfinite(x) for x in run[key]), key
    assert len(run["ess"]) == len(run["batch_reward"]) == steps
    assert all(0.0 <= x <= 1.0 + 1e-6 for x in run["ess"] + run["eval_reward"])
    assert math.isfinite(run["final_reward"])
    assert isinstance(run["collapsed"], bool)


@pytest.mark.parametrize(
    ("condition", "method"),
    [
        (study.Condition("stale-1", staleness=1, epochs=2), "ess"),
        (study.CONDITIONS["mismatch-sampling"], "tis"),
        (study.CONDITIONS["on-policy"], "clip-higher"),
    ],
)
def test_run_cell_is_finite(init_state, condition, method):
    run = study.run_cell(CFG, condition, study.METHODS[method], 0, init_state)
    _check_run(run, CFG.steps)
    if method == "ess":
        assert len(run["capped_frac"]) == CFG.steps


def test_on_policy_ratios_are_one(init_state):
    run = study.run_cell(CFG, study.CONDITIONS["on-policy"], study.METHODS["ess"], 0, init_state)
    assert all(abs(x - 1.0) < 1e-4 for x in run["ess"])


def test_summary_tables_and_plots(init_state, tmp_path):
    conditions = {"on-policy": study.CONDITIONS["on-policy"]}
    methods = [study.METHODS[m] for m in ("ess", "clip-0.2", "clip-higher")]
    runs = [
        study.run_cell(CFG, c, m, s, init_state) for c, m, s in study.plan(conditions, methods, [0])
    ]
    summary = study.summarize(runs, conditions, methods)
    entry = summary["on-policy"]
    assert entry["tuned_clip"]["method"] in ("clip-0.2", "clip-higher")
    assert "ess_vs" in entry["untuned_clip"]
    result = {
        "environment": study.environment(["--test"]) | {"wall_seconds": 0.0},
        "config": dataclasses.asdict(CFG),
        "conditions": {k: dataclasses.asdict(v) for k, v in conditions.items()},
        "methods": {m.name: dataclasses.asdict(m) for m in methods},
        "tis_cap": study.TIS_CAP,
        "seeds": [0],
        "summary": summary,
        "runs": runs,
    }
    md = study.markdown(result)
    assert "| on-policy |" in md
    study.plot(result, tmp_path)
    for name in ("reward_curves.png", "ess_curves.png", "final_reward.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_collapse_rule():
    assert study.collapsed([0.2, 0.8, 0.3, 0.1])
    assert not study.collapsed([0.2, 0.8, 0.3])  # one point below half the peak is not enough
    assert not study.collapsed([0.2, 0.8, 0.3, 0.5])  # recovered
    assert not study.collapsed([0.2, 0.4, 0.8])
