"""Entry point of the off-policy study; the code lives in ``benchmarks/offpolicy/``.

    python benchmarks/offpolicy_study.py --seeds 2          # stale-rollout study -> docs/results/offpolicy/{map,confirm}
    python benchmarks/offpolicy_study.py --quick --out DIR  # CI smoke (< 3 min)
    python benchmarks/offpolicy_study.py --replot           # rebuild tables and plots

See ``benchmarks/offpolicy/study.py`` for the options and docs/results/offpolicy/results.md for
the committed results.
"""

from __future__ import annotations

from offpolicy.study import main  # benchmarks/ is on the path: this script's folder

if __name__ == "__main__":
    main()
