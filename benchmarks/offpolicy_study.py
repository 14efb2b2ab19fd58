"""Entry point of the off-policy study; the code lives in ``benchmarks/offpolicy/``.

    python benchmarks/offpolicy_study.py                    # full study -> docs/results/offpolicy
    python benchmarks/offpolicy_study.py --quick --out DIR  # CI smoke (< 3 min)
    python benchmarks/offpolicy_study.py --replot           # rebuild tables and plots

See ``benchmarks/offpolicy/study.py`` for the options and docs/results/offpolicy/results.md for
the committed results.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from offpolicy.study import main

if __name__ == "__main__":
    main()
