#!/usr/bin/env bash
# CI step for the parallel-layout tests (issue 18): install megatron-core's parallel_state and run
# tests/test_parallel_layouts.py with skipping turned into failure. Assumes the main .venv is active.
# megatron-core 0.16.1 is a 2.6 MB wheel (Linux, cp310-cp312) whose only requirements (torch,
# numpy, packaging) the project already has; --no-deps keeps the pinned torch untouched.
# Takes ~5 s to install and 1-3 min to run (4 processes each import megatron-core and verl).
set -euo pipefail
cd "$(dirname "$0")/.."

pip install -q --no-deps megatron-core==0.16.1
python -c "import importlib.metadata as m; print('megatron-core', m.version('megatron-core'))"

# ESS_PO_REQUIRE_MEGATRON=1: the module fails instead of skipping when megatron-core is missing.
# Export it for the full-suite run as well if this script only installs (ESS_PO_PARALLEL_INSTALL_ONLY=1).
if [[ "${ESS_PO_PARALLEL_INSTALL_ONLY:-0}" != "1" ]]; then
    ESS_PO_REQUIRE_MEGATRON=1 python -m pytest tests/test_parallel_layouts.py -q -p no:cacheprovider
fi
