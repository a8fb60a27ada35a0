#!/bin/bash
# GPU checks: the tests that only run on a GPU (real CUDA graphs: tests/test_cudagraph.py), from the repository
# root on the GPU machine: `bash benchmarks/gpu_checks.sh [pytest args]` (lent machine: one run call on
# nvidia-h200 with carry [".whl"], the wheels of README.md's "Rerunning on the lent GPU machine").
# Fails when no CUDA device is visible (the tests would only skip). Without diffusers installed, the wheels in
# .whl/ go into /tmp/site first; without an installed ditpass (its ditpass.passes is the top-level passes/),
# /tmp/ditpass_pkg gets a package of links to this checkout's ditpass/, passes/ and models/.
set -u
cd "$(dirname "$0")/.."
GPU_TESTS=(tests/test_cudagraph.py)
PY=(python3)
if ! python3 -c 'import diffusers' 2>/dev/null; then
  SITE=${BENCH_SITE:-/tmp/site}
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || echo "warning: the wheels in .whl/ did not all install"
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  python3 -c 'import diffusers' 2>/dev/null || { echo "diffusers missing (and no usable .whl/: carry it)"; exit 1; }
fi
if ! python3 -c 'import ditpass.passes, ditpass.models' 2>/dev/null; then
  PKG=/tmp/ditpass_pkg
  rm -rf "$PKG" && mkdir -p "$PKG/ditpass"
  ln -s "$PWD"/ditpass/* "$PKG/ditpass/" && ln -s "$PWD/passes" "$PKG/ditpass/passes" && ln -s "$PWD/models" "$PKG/ditpass/models"
  export PYTHONPATH=$PKG${PYTHONPATH:+:$PYTHONPATH}
  PY=(python3 -P)  # not the checkout's ditpass/ from the current directory, which lacks ditpass.passes
fi
python3 -c 'import pytest' 2>/dev/null || { echo "pytest missing"; exit 1; }
"${PY[@]}" -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.device_count(), "GPU(s)"); sys.exit(0 if torch.cuda.is_available() else 1)' \
  || { echo "no CUDA device: the GPU checks would only skip"; exit 1; }
exec "${PY[@]}" -m pytest -q -rs -p no:cacheprovider "${GPU_TESTS[@]}" "$@"
