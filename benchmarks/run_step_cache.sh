#!/bin/bash
# Step caching's speed on the GPU machine (benchmarks/bench_step_cache.py), from the repository root.
#   bash benchmarks/run_step_cache.sh                 # kind nvidia-h200: 1 GPU, compiled, with diffusers' FBC rows
#   SC_GPUS=4 bash benchmarks/run_step_cache.sh       # kind nvidia-h200-x4: Ulysses 4, compiled (ditpass rows only)
#   SC_CONFIGS=uncached,every2 SC_DEADLINE=450 SC_EXTRA="--res 1024 --steps 28"
# Needs .whl/ carried (git-ignored): diffusers 0.42.1 and importlib_metadata 8.7.0, the packages the GPU image
# lacks (bash benchmarks/prep_arch_check.sh or run_fastattn.sh prep downloads them). Records: $OUT/step_cache_w<N>.jsonl
# and .md, $OUT/log_step_cache_w<N>.txt, $OUT/env.txt. Time (estimate, no GPU run yet): ~5-6 minutes; the
# deadline bounds the configurations (what does not fit is recorded as skipped) and the script is killed at 580 s.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/raw}
export OUT
mkdir -p "$OUT"
GPUS=${SC_GPUS:-1}
LOG=$OUT/log_step_cache_w$GPUS.txt
: > "$LOG"
note() { echo "[step_cache +${SECONDS}s] $*" | tee -a "$LOG"; }
if ls .whl/*.whl >/dev/null 2>&1; then
  SITE=${BENCH_SITE:-/tmp/site}
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .whl/diffusers-*.whl .whl/importlib_metadata-*.whl || note "warning: the wheels in .whl/ did not all install"
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c 'import diffusers' 2>/dev/null || { note "diffusers missing (carry .whl/)"; exit 1; }
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
{ nvidia-smi; python3 -c 'import torch, diffusers; print(torch.__version__, torch.version.cuda, torch.cuda.device_count(), diffusers.__version__)'; } \
  > "$OUT/env.txt" 2>&1
CONFIGS=${SC_CONFIGS:-uncached,every2,diffusers,diffusers-fbc@0.1,fbcache@0.1,taylorseer@0.1,every4}
note "bench_step_cache.py on $GPUS GPU(s): $CONFIGS"
timeout --kill-after=8 $((580 - SECONDS)) python3 -m torch.distributed.run --standalone --nproc_per_node=$GPUS \
  benchmarks/bench_step_cache.py --configs "$CONFIGS" --deadline "${SC_DEADLINE:-450}" ${SC_EXTRA:-} >> "$LOG" 2>&1
note "exit $?"
grep -E '^\[[0-9:]+ ' "$LOG" | cut -c1-240 | tail -20
cat "$OUT/step_cache_w$GPUS.md" 2>/dev/null
