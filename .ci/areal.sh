#!/usr/bin/env bash
# Opt-in AReaL path: a separate virtual environment (.venv-areal) with AReaL 1.0.4, then the
# tests under tests/areal/ (AReaL's FSDP2 engine, FSDPPPOActor, on CPU with gloo).
# Kept out of the main environment: AReaL caps transformers at 5.3.0 (constraints.txt pins
# 5.10.4) and imports ray, wandb, swanlab, trackio, openai and datasets at module level.
#
# torch: AReaL 1.0.4 declares torch>=2.9.1,<2.11, and CI installs that (AREAL_TORCH, default
# 2.10.0): PyPI's CUDA build (0.9 GB wheel + ~3 GB of nvidia-* wheels, ~150 s, 8.1 GB venv), which
# runs on the CPU. AREAL_TORCH=2.13.0 takes the CPU wheel on this project's machines instead (~70 s,
# 2.1 GB; same CPU train-step numbers, checked once by hand): for local work only.
# AReaL itself is installed with --no-deps: its metadata asks for ~80 packages (litellm,
# openhands, sglang extras, torchvision ...) that its training engine never imports;
# constraints-areal.txt pins what the imports need. pip then lists those unmet requirements as
# "dependency conflicts" (expected; the install does not fail on them).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-areal
TORCH="${AREAL_TORCH:-2.10.0}"
start=$SECONDS
# AREAL_PHASE: "all" (default), "install" (build the venv only) or "test" (use the built venv).
phase="${AREAL_PHASE:-all}"

if [[ "$phase" != "test" ]]; then
echo "== areal: venv $VENV (from scratch)"
python3 -m venv --clear "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip

echo "== areal: install"
pip install -q "torch==$TORCH"
# AReaL's metadata asks for ~80 packages (litellm, openhands, sglang extras, torchvision ...)
# the training engine never imports; constraints-areal.txt lists what the imports need.
pip install -q --no-deps areal==1.0.4
# Every line of constraints-areal.txt is an exact pin; as a requirements file it installs the
# whole frozen set, and naming torch here keeps the resolver off other torch builds.
pip install -q "torch==$TORCH" -r constraints-areal.txt
pip install -q --no-deps -e .
# transformers imports torchvision when present; PyPI's build fails to load beside the CPU torch.
if python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torchvision') is None)"; then
    echo "torchvision is installed in $VENV; it must not be" >&2
    exit 1
fi
echo "   install took $((SECONDS - start)) s (torch $(python -c 'import torch; print(torch.__version__)'))"
fi
[[ "$phase" == "install" ]] && exit 0
# shellcheck disable=SC1091
. "$VENV/bin/activate"

echo "== areal: tests"
# ESS_PO_REQUIRE_AREAL: an AReaL that fails to import is an error here, not a skip
ESS_PO_REQUIRE_AREAL=1 python -m pytest tests/areal -q -p no:cacheprovider
echo "== areal: done in $((SECONDS - start)) s"
