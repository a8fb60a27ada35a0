#!/bin/bash
# Run bench_sp.py for several world sizes in one go, from the repository root, on one host.
#   WORLDS="4 2" BENCH_DEADLINE=560 bash benchmarks/run_gpu.sh [bench_sp.py args, e.g. --res 1024 2048]
# Records go to $OUT (default benchmarks/results/raw): sp_flux_w<N>.jsonl, log_w<N>.txt, env.txt.
# Without diffusers installed, wheels in .whl/ are installed into /tmp/site first.
set -u
OUT=${OUT:-benchmarks/results/raw}
mkdir -p "$OUT"
if ! python3 -c 'import diffusers' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "diffusers missing and the wheels in .whl/ did not install"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# NVLink multicast stays off (shared machines); unbuffered output for the logs
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export BENCH_RUN_ID=${BENCH_RUN_ID:-$(date -u +%Y%m%dT%H%M%S)-$RANDOM}
DEADLINE=${BENCH_DEADLINE:-3600}
{ nvidia-smi; nvidia-smi topo -m; python3 -c 'import torch, diffusers; print(torch.__version__, torch.version.cuda, torch.cuda.device_count(), diffusers.__version__)'; lscpu | head -20; } > "$OUT/env.txt" 2>&1
echo "run $BENCH_RUN_ID"
for w in ${WORLDS:-4 2}; do
  left=$((DEADLINE - SECONDS))
  if [ $left -lt 60 ]; then echo "world $w: not run, ${left}s left"; continue; fi
  timeout --kill-after=15 $left python3 -m torch.distributed.run --nproc_per_node=$w benchmarks/bench_sp.py "$@" \
    > "$OUT/log_w$w.txt" 2>&1
  echo "world $w: exit $? after ${SECONDS}s"
  grep -E '^\[[0-9:]+\]|Error|error' "$OUT/log_w$w.txt" | grep -v -E 'Warning|warn' | cut -c1-300 | tail -40
done
python3 benchmarks/summarize.py "$OUT"/sp_flux_w*.jsonl
