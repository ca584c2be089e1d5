#!/usr/bin/env bash
# bench/gpu_check.sh: the one-GPU check in one command, one table (bench/gpu_check.py lists its
# rows). On a machine without a CUDA GPU it says so and exits 0; on one it stops after 8 minutes.
#   bash bench/gpu_check.sh                              # PYTHON=... to pick the interpreter
#   VLLM_PYTHON=~/vllm-venv/bin/python bash bench/gpu_check.sh     # + ours vs vLLM
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
then
    echo "bench/gpu_check.sh: needs a CUDA GPU (none here); nothing measured"
    exit 0
fi
exec timeout 480 "$PY" bench/gpu_check.py "$@"
