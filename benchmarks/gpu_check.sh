#!/usr/bin/env bash
# gpu-check: bash benchmarks/gpu_check.sh OUT [gpu_check.py options]  (what `make gpu-check OUT=dir` runs)
# On a GPU machine it uses the system python3 (no venv is built there); elsewhere the project's
# .venv, in smoke mode. PYTHON=... picks another interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then echo "usage: bash benchmarks/gpu_check.sh OUT [options]" >&2; exit 2; fi
out=$1; shift
if [ -z "${PYTHON:-}" ]; then
  if nvidia-smi -L >/dev/null 2>&1 || [ ! -x .venv/bin/python ]; then PYTHON=python3; else PYTHON=.venv/bin/python; fi
fi
exec "$PYTHON" benchmarks/gpu_check.py --out "$out" "$@"
