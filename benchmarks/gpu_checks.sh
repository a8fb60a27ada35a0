#!/bin/bash
# GPU checks: the tests that only run on a GPU (real CUDA graphs: tests/test_cudagraph.py), from the repository
# root on the GPU machine: `bash benchmarks/gpu_checks.sh [pytest args]` (lent machine: one run call on
# nvidia-h200 with carry [".whl"], the wheels of README.md's "Rerunning on the lent GPU machine").
# Fails when no CUDA device is visible (the tests would only skip). benchmarks/device_env.sh installs what is
# missing there.
set -u
cd "$(dirname "$0")/.."
GPU_TESTS=(tests/test_cudagraph.py)
. benchmarks/device_env.sh
python3 -c 'import pytest' 2>/dev/null || { echo "pytest missing"; exit 1; }
"${PY[@]}" -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.device_count(), "GPU(s)"); sys.exit(0 if torch.cuda.is_available() else 1)' \
  || { echo "no CUDA device: the GPU checks would only skip"; exit 1; }
exec "${PY[@]}" -m pytest -q -rs -p no:cacheprovider "${GPU_TESTS[@]}" "$@"
