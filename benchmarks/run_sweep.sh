#!/bin/bash
# The zoo sweep (benchmarks/sweep_zoo.py) with the compile="inductor" column, on the lent GPU machine's CPUs
# (16 cores: 8 classes at once), from the repository root: one run call on nvidia-h200 with carry [".whl"]:
#   bash benchmarks/run_sweep.sh [sweep_zoo.py args]
# Writes $OUT/sweep_zoo_inductor.md (and the log). The sweep itself runs on CPU with gloo, as on a laptop.
set -u
cd "$(dirname "$0")/.."
. benchmarks/device_env.sh
OUT=${OUT:-/tmp/sweep_out}
mkdir -p "$OUT"
export TORCHINDUCTOR_COMPILE_THREADS=1 PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=
nproc
"${PY[@]}" benchmarks/sweep_zoo.py --inductor --jobs "${SWEEP_JOBS:-8}" --out "$OUT/sweep_zoo_inductor.md" "$@" 2>&1 | tee "$OUT/log_sweep.txt"
