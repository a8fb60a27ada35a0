#!/bin/bash
# DiTFastAttn speed on the GPU machine (benchmarks/bench_fastattn.py), from the repository root.
#   bash benchmarks/run_fastattn.sh prep          # HERE (no GPU): the wheels into .whl/ (git-ignored: carry it)
#   bash benchmarks/run_fastattn.sh               # GPU, kind nvidia-h200: 1 GPU
#   FA_GPUS=4 bash benchmarks/run_fastattn.sh     # GPU, kind nvidia-h200-x4: Ulysses 4
#   FA_DEADLINE=540 (seconds for bench_fastattn.py) FA_RES="1024 2048" FA_MODELS=pixart,flux
#   FA_EXTRA="--iters 2" FA_KERNEL=auto|flex|fa3 (DITPASS_WINDOW_KERNEL; default: flex unless the fa3 probe passes)
# Wheels (.whl/): diffusers 0.42.1 and importlib_metadata 8.7.0 (the GPU image lacks them; see prep_arch_check.sh),
# fa3_fwd 0.0.3 (27.6 MB, FlashAttention-3 forward; einops, packaging and ninja are in the image). fa3_fwd 0.0.3
# is built with FLASHATTENTION_DISABLE_LOCAL (its fa3_fwd_config.py says so) and for torch 2.10, so its sliding
# window is expected to fail there: the probe below tries one call in a separate process and the benchmark then
# runs FlexAttention (block mask, compiled); the probe's output is in $OUT/env.txt and each record's window_kernel.
# Records: $OUT/fastattn_w<N>.jsonl and .md, $OUT/log_fastattn_w<N>.txt, $OUT/env.txt.
# Time (estimate, not measured: no GPU run yet): wheels ~15 s; per model a build (FLUX.1-dev random bf16 on the
# GPU ~20 s), per resolution a capture + passes (~20-30 s at full size) and the window kernel's compile per
# sequence length (~20-40 s), then 3-4 schedules x (3 warm-up steps + one loop of 20 / 28 steps): FLUX at 2048
# ~25 s per loop on 1 GPU. About 5-7 minutes in all; FA_DEADLINE bounds it (what does not fit is recorded as
# skipped), and the whole script is killed at 580 s.
set -u
cd "$(dirname "$0")/.."

if [ "${1:-}" = prep ]; then
  mkdir -p .whl
  for spec in diffusers==0.42.1 importlib_metadata==8.7.0 fa3-fwd==0.0.3; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "$spec" || echo "could not download $spec"
  done
  ls -la .whl
  t=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r stat -c %s 2>/dev/null \
       | awk '{s+=$1} END {print s}')
  w=$(du -sb .whl | cut -f1)
  echo "travels: working tree $((t / 1048576)) MiB + .whl $((w / 1048576)) MiB = $(((t + w) / 1048576)) MiB (limit 64)"
  exit 0
fi

OUT=${OUT:-benchmarks/results/raw}
export OUT
mkdir -p "$OUT"
GPUS=${FA_GPUS:-1}
LOG=$OUT/log_fastattn_w$GPUS.txt
: > "$LOG"
note() { echo "[fastattn +${SECONDS}s] $*" | tee -a "$LOG"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  SITE=${BENCH_SITE:-/tmp/site}
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || note "warning: the wheels in .whl/ did not all install"
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c 'import diffusers' 2>/dev/null || { note "diffusers missing (carry .whl/: bash benchmarks/run_fastattn.sh prep)"; exit 1; }
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1

# FA3's sliding window, tried once in its own process (a broken extension must not take the benchmark down)
PROBE=$(timeout 120 python3 - 2>&1 <<'EOF'
import torch
from fa3_fwd_interface import flash_attn_func
q = torch.randn(1, 1024, 8, 128, device="cuda", dtype=torch.bfloat16)
out = flash_attn_func(q, q, q, window_size=(64, 64))
out = out[0] if isinstance(out, (tuple, list)) else out
ref = torch.nn.functional.scaled_dot_product_attention(*(q.transpose(1, 2),) * 3, attn_mask=(
    (torch.arange(1024)[:, None] - torch.arange(1024)[None]).abs() <= 64).cuda()).transpose(1, 2)
print("fa3 sliding window ok, max diff", float((out.float() - ref.float()).abs().max()))
EOF
)
if echo "$PROBE" | grep -q "fa3 sliding window ok"; then KERNEL=${FA_KERNEL:-fa3}; else KERNEL=${FA_KERNEL:-flex}; fi
note "fa3 probe: $(echo "$PROBE" | tail -1 | cut -c1-300); window kernel: $KERNEL"
{ nvidia-smi; python3 -c 'import torch, diffusers, triton; print(torch.__version__, torch.version.cuda, torch.cuda.device_count(), diffusers.__version__, triton.__version__)';
  echo "fa3 probe:"; echo "$PROBE"; } > "$OUT/env.txt" 2>&1

DEADLINE=${FA_DEADLINE:-540}
note "bench_fastattn.py on $GPUS GPU(s), deadline ${DEADLINE}s"
timeout --kill-after=8 $((580 - SECONDS)) python3 -m torch.distributed.run --standalone --nproc_per_node=$GPUS \
  benchmarks/bench_fastattn.py --ulysses "$GPUS" --res ${FA_RES:-1024 2048} --models "${FA_MODELS:-pixart,flux}" \
  --window-kernel "$KERNEL" --deadline "$DEADLINE" ${FA_EXTRA:-} >> "$LOG" 2>&1
note "exit $?"
grep -E '^\[[0-9:]+ ' "$LOG" | cut -c1-240 | tail -30
cat "$OUT/fastattn_w$GPUS.md" 2>/dev/null
