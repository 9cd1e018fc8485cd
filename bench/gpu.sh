#!/usr/bin/env bash
# The trainer's GPU loop measured on an NVIDIA GPU: model FLOP utilisation, samples/s of
# `run_training` against a bare loop, and scaling from 1 to N GPUs (see bench/gpu.py).
# Needs PyTorch with CUDA, timm, numpy and pydantic (the project's venv has them) and
# nothing from the network. Bounded to 5 minutes; `--quick` takes about two. Without a
# CUDA device (or with `--cpu`) it is a smoke run on the CPU. `--json PATH` keeps figures.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON="$(command -v python3)"; fi
fi
"$PYTHON" - <<'PY' || { echo "gpu.sh: $PYTHON lacks torch, timm, numpy or pydantic" >&2; exit 2; }
import numpy, pydantic, timm, torch  # noqa: F401
PY
if [[ " $* " != *" --cpu "* ]] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout --signal=TERM --kill-after=10 300 "$PYTHON" -m bench.gpu "$@"
