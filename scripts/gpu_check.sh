#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): `echoatt bench --arch` at the sizes GPU users run — TinyLlama-1.1B (9 of 22
# layers follow, copy and LiSA; decode also from a static cache under CUDA graphs), the default plan at
# SmolLM2-135M's shape, a drop plan at Llama-3.2-1B's, Mistral-7B prefill and decode at 64 x 2048, train and
# distillation steps at 4 x 1024 — with a table at the end (OUT/gpu_check.md). Needs PyTorch and transformers only;
# echoatt runs from src/. `QUICK=1` runs the same jobs at tiny sizes on any device (CI does).
#   bash scripts/gpu_check.sh [OUT [--only JOB,JOB]]   (each job's results written as it ends)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec "${PYTHON:-python3}" scripts/gpu_check.py "${1:-runs/gpu-check}" ${QUICK:+--quick --repeats 1} "${@:2}"
