#!/bin/bash
# The parallel VAE's decode time and peak memory on the GPU machine (benchmarks/bench_vae.py), from the repo root.
#   bash benchmarks/run_vae.sh                 # kind nvidia-h200: 1 GPU: plain, tiled, ditpass (no split)
#   VAE_GPUS=4 bash benchmarks/run_vae.sh      # kind nvidia-h200-x4: plain and tiled on rank 0, ditpass on 4
#   VAE_SIZES=2048,4096,8192 VAE_CONFIGS=plain,ditpass VAE_ITERS=2
# Needs .whl/ carried (git-ignored; bash benchmarks/run_fastattn.sh prep fills it, and
# pip download distvae --no-deps -d .whl adds xDiT's DistVAE for the peer row). Records: $OUT/vae_w<N>.jsonl
# and .md, $OUT/log_vae_w<N>.txt, $OUT/env.txt. Killed at 580 s; the deadline records what does not fit as skipped.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/raw}
export OUT
mkdir -p "$OUT"
GPUS=${VAE_GPUS:-1}
LOG=$OUT/log_vae_w$GPUS.txt
: > "$LOG"
note() { echo "[vae +${SECONDS}s] $*" | tee -a "$LOG"; }
if ls .whl/*.whl >/dev/null 2>&1; then
  SITE=${BENCH_SITE:-/tmp/site}
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .whl/diffusers-*.whl .whl/importlib_metadata-*.whl $(ls .whl/distvae-*.whl 2>/dev/null) || note "warning: the wheels in .whl/ did not all install"
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c 'import diffusers' 2>/dev/null || { note "diffusers missing (carry .whl/)"; exit 1; }
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
{ nvidia-smi; python3 -c 'import torch, diffusers; print(torch.__version__, torch.version.cuda, torch.cuda.device_count(), diffusers.__version__)'; } \
  > "$OUT/env.txt" 2>&1
note "bench_vae.py on $GPUS GPU(s)"
timeout --kill-after=8 $((580 - SECONDS)) python3 -m torch.distributed.run --standalone --nproc_per_node=$GPUS \
  benchmarks/bench_vae.py --sizes "${VAE_SIZES:-2048,4096,8192,10240}" --configs "${VAE_CONFIGS:-plain,tiled,distvae,ditpass}" \
  --iters "${VAE_ITERS:-2}" --deadline "${VAE_DEADLINE:-470}" >> "$LOG" 2>&1
note "exit $?"
grep -E '^\[[0-9:]+ ' "$LOG" | cut -c1-300 | tail -20
cat "$OUT/vae_w$GPUS.md" 2>/dev/null
