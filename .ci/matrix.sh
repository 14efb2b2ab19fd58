#!/usr/bin/env bash
# Second cell of the version matrix: the TRL path with the newest transformers and accelerate
# that TRL 1.16 accepts (constraints-latest.txt), in its own venv (.venv-latest), without verl
# (verl 0.9.1 caps transformers<5.11). Installs the demo extra (TRL plus matplotlib, which the
# demo's test and the off-policy study's plot test need) and the test extra. Runs the TRL
# contract test (failing if it skips), then the whole suite (the verl and docs modules skip).
# The first cell is .ci/run's main .venv (constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

rm -rf .venv-latest
python3 -m venv .venv-latest
# shellcheck disable=SC1091
. .venv-latest/bin/activate
python -m pip install -q --upgrade pip

echo "== install (constraints-latest.txt) ($SECONDS s)"
pip install -q -c constraints-latest.txt -e ".[demo,test]"

echo "== versions"
expected=$(sed -n 's/^transformers==//p' constraints-latest.txt)
installed=$(python -c "import transformers; print(transformers.__version__)")
python -c "import torch, trl, transformers, accelerate; print('torch', torch.__version__, '| trl', trl.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__)"
if [ "$installed" != "$expected" ]; then
    echo "transformers $installed installed, constraints-latest.txt pins $expected" >&2
    exit 1
fi
if python -c "import verl" 2>/dev/null; then
    echo "verl must not be installed in this cell" >&2
    exit 1
fi

echo "== no downgrade: the trl extra, without constraints, changes nothing but ess-po ($SECONDS s)"
would=$(pip install --dry-run -e ".[trl]" 2>/dev/null | sed -n 's/^Would install //p')
echo "would install: ${would:-nothing}"
for dist in $would; do
    case "$dist" in
        ess-po-*) ;;
        *) echo "installing the trl extra would change $dist" >&2; exit 1 ;;
    esac
done

echo "== TRL contract test (must run here, not skip) ($SECONDS s)"
log=$(mktemp)
python -m pytest -q -p no:cacheprovider -rs tests/trl/test_trl_contract.py | tee "$log"
if grep -q SKIPPED "$log"; then
    echo "the TRL contract test skipped in this cell" >&2
    exit 1
fi

# MATRIX_FAST=1 runs only the fast loop here (-m "not slow"), if CI time runs short.
echo "== tests: the suite (verl and docs modules skip: not installed here) ($SECONDS s)"
if [ "${MATRIX_FAST:-0}" = 1 ]; then
    python -m pytest -q -p no:cacheprovider -m "not slow"
else
    python -m pytest -q -p no:cacheprovider
fi
echo "== matrix cell done in $SECONDS s"
