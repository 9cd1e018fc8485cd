#!/usr/bin/env bash
# convnext_large in bf16 through the trainer's own loop vs a bare loop, on an NVIDIA GPU.
# Needs PyTorch with CUDA, timm, numpy and pydantic (the project's venv has them) and
# nothing from the network. Bounded to 5 minutes. `bench/gpu.sh --cpu` is a smoke run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON="$(command -v python3)"; fi
fi
"$PYTHON" - <<'PY' || { echo "gpu.sh: $PYTHON lacks torch, timm, numpy or pydantic" >&2; exit 2; }
import numpy, pydantic, timm, torch  # noqa: F401
PY
if [[ " $* " != *" --cpu "* ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout --signal=TERM --kill-after=10 300 "$PYTHON" -m bench.gpu "$@"
