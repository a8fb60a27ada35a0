#!/bin/bash
# Architecture check on ONE GPU: the old ditpass tree (benchmarks/.base_src, made by prep_arch_check.sh:
# d1a692f) and this working tree, each in its own bench_perf.py invocation, one after the other under one
# run_id, with compiled diffusers (the 1-GPU reference) timed again in each invocation. Nothing else runs.
#   bash benchmarks/run_arch_check.sh                      # on the GPU machine, from the repository root
#   ARCH_DEADLINE=540 (whole script, seconds) ARCH_RES="1024 2048" ARCH_IPLANS=single,single+f,single+gf,single+g
#   ARCH_EPLANS=single ARCH_EXTRA="--iters 5" ARCH_ORDER="base new" NEW_LABEL=<commit of the working tree>
#   ARCH_EST_SCALE=0.6 ARCH_MIN_SHARE=90 (see below); BASE_SRC=benchmarks/.base_src
#   ARCH_GPUS=4 (kind nvidia-h200-x4): ulysses=4 plans u4, u4+g and diffusers' Ulysses-4 context parallelism
# Smoke (GPU, tiny model, ~1 min): ARCH_DEADLINE=150 ARCH_MIN_SHARE=30 ARCH_EST_SCALE=0 ARCH_RES=512
#   ARCH_IPLANS=single+g ARCH_EXTRA="--layers 1 --single 1 --iters 2 --warmup 1" ARCH_ORDER="new base"
# Per invocation (bench_perf.py --order kind, its priority order): diffusers eager (reference) at each res,
# ditpass compile="inductor" for ARCH_IPLANS (the last 1-GPU run, 20261126T164004-11689: single, single+f,
# single+gf; plus single+g, CUDA graphs alone), diffusers compile_repeated_blocks (regional), ditpass eager
# (ARCH_EPLANS). Each tree gets half of the time left (its own --deadline-at; what does not fit is recorded
# as skipped) and its own cold inductor cache (TORCHINDUCTOR_CACHE_DIR), so first_call_s compares too.
# Both use this checkout's benchmarks/bench_perf.py (benchmarks/ is the same at d1a692f but for
# profile_step.py); the tree is chosen by BENCH_DITPASS_SRC. BASE_HARNESS=own runs the base tree's own copy
# (benchmarks/.base_src/benchmarks/bench_perf.py) instead, should this one stop fitting the old API.
# Records: $OUT/perf_arch_w1.jsonl (both trees; ditpass_commit tells them apart: the base's COMMIT, and
# "<label>+src<hash of the .py files of ditpass/ and passes/>" for the working tree), $OUT/log_arch.txt,
# $OUT/env.txt, $OUT/compare_arch.md (benchmarks/compare_arch.py; printed last).
# Time (from the records of runs -11689 and -perf and a smoke call on 1x H200): wheel install ~13 s, then per
# tree ~8 s of torchrun/imports + ~14 s model build + refs 10 s + inductor plans ~137 s (the first plan at each
# res pays the export and the compile: ~41 s at 1024, ~36 s at 2048; the others reuse them, 5 to 17 s) +
# compiled diffusers ~20 s + eager ~11 s: ~200 s, so ~7 min in all; ARCH_DEADLINE bounds it (540 s: ends by
# ~550 s). Left out against run_perf.sh: Wan2.1 (--video), xDiT, 2 and 4 GPUs; iterations stay 5 after 2
# warm-ups, as in the records. Copy the records to benchmarks/results/perf_arch_<date>.jsonl, not into
# perf_flux_<date>.jsonl: plot_perf.py keys rows by (res, system, plan, compile) and would keep one tree only.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/raw}
export OUT
mkdir -p "$OUT"
DEADLINE=${ARCH_DEADLINE:-540}
BASE_SRC=${BASE_SRC:-benchmarks/.base_src}
JSONL=$OUT/perf_arch_w1.jsonl
LOG=$OUT/log_arch.txt
: > "$LOG"
note() { echo "[arch +${SECONDS}s] $*" | tee -a "$LOG"; }

if ! python3 -c 'import diffusers' 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    SITE=${BENCH_SITE:-/tmp/site}
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      || note "warning: the wheels in .whl/ did not all install"
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  fi
  python3 -c 'import diffusers' 2>/dev/null || { note "diffusers missing (and no usable .whl/: carry it)"; exit 1; }
fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export BENCH_RUN_ID=${BENCH_RUN_ID:-$(date -u +%Y%m%dT%H%M%S)-arch$RANDOM}

srchash() { (cd "$1" && find ditpass passes -name '*.py' -print0 2>/dev/null | LC_ALL=C sort -z \
             | xargs -0 -r sha256sum | sha256sum | cut -c1-8); }
NEW_SRC=$PWD
NEW_HASH=$(srchash "$NEW_SRC")
if [ -z "${NEW_LABEL:-}" ]; then
  # not git: the device copy's git metadata need not be this checkout's HEAD (it read d1a692f once)
  NEW_LABEL="wt@$(cat "$BASE_SRC/PREP_HEAD" 2>/dev/null || echo unknown)"
fi
NEW_LABEL="$NEW_LABEL+src$NEW_HASH"
ORDER=${ARCH_ORDER:-base new}
if [ ! -f "$BASE_SRC/ditpass/__init__.py" ]; then
  note "no base tree in $BASE_SRC (run benchmarks/prep_arch_check.sh here first): the working tree only"
  ORDER=new
else
  BASE_LABEL=$(cat "$BASE_SRC/COMMIT" 2>/dev/null || echo base)
  BASE_HASH=$(srchash "$BASE_SRC")
  [ "$BASE_HASH" = "$NEW_HASH" ] && note "warning: the base and working trees have the same ditpass/ and passes/"
fi

{ nvidia-smi; python3 -c 'import torch, diffusers, triton; print(torch.__version__, torch.version.cuda, torch.cuda.device_count(), diffusers.__version__, triton.__version__)';
  echo "run $BENCH_RUN_ID; base ${BASE_LABEL:-none} (src ${BASE_HASH:-}) in $BASE_SRC; new $NEW_LABEL"; lscpu | head -20; } > "$OUT/env.txt" 2>&1 &
ENV_PID=$!  # in the background: its cold imports took ~13 s, and it is done long before any timing starts
note "run $BENCH_RUN_ID: order '$ORDER'; base ${BASE_LABEL:-none} (src ${BASE_HASH:-}); new $NEW_LABEL"

RES=${ARCH_RES:-1024 2048}
GPUS=${ARCH_GPUS:-1}  # 4: ulysses=4 plans, and diffusers' Ulysses-4 context parallelism (compiled) as the peer
if [ "$GPUS" -gt 1 ]; then
  IPLANS=${ARCH_IPLANS:-u$GPUS,u$GPUS+g}; EPLANS=${ARCH_EPLANS:-u$GPUS}; KINDS=ref,ditpass-inductor,diffusers-compiled,ditpass-eager,diffusers-cp
else
  IPLANS=${ARCH_IPLANS:-single,single+f,single+gf,single+g}; EPLANS=${ARCH_EPLANS:-single}
  KINDS=ref,ditpass-inductor,diffusers-compiled,ditpass-eager
fi
ARGS=(--res $RES --plans "$EPLANS" --inductor-plans "$IPLANS" --xdit-plans none
      --measure $KINDS ${ARCH_EXTRA:-})
GRACE=20    # bench_perf.py's --grace: a measurement may run this long past --deadline-at (then its watchdog)
TAIL=${ARCH_TAIL:-10}  # seconds kept for the comparison at the end
# bench_perf.py starts a measurement only if the time left covers its rough estimate (EST_S) x this scale;
# EST_S is generous for later plans (the capture and the compiled regions are reused): 0.6 fits the history
EST=${ARCH_EST_SCALE:-0.6}
MIN=${ARCH_MIN_SHARE:-90}  # a tree (or its resume) is not started with fewer seconds than this
n=$(wc -w <<< "$ORDER"); i=0
for tree in $ORDER; do
  i=$((i + 1))
  left=$((DEADLINE - TAIL - SECONDS))
  share=$((left / (n - i + 1)))   # this tree's seconds, the last one gets all that is left
  end=$((SECONDS + share))        # in $SECONDS; the invocation is killed by then
  if [ $share -lt $MIN ]; then note "$tree: not run, ${share}s left for it"; continue; fi
  if [ "$tree" = base ]; then src=$BASE_SRC; label=$BASE_LABEL; else src=$NEW_SRC; label=$NEW_LABEL; fi
  script=benchmarks/bench_perf.py
  if [ "$tree" = base ] && [ "${BASE_HARNESS:-}" = own ]; then script=$BASE_SRC/benchmarks/bench_perf.py; fi
  part=$OUT/part_$tree.jsonl; rm -f "$part"
  for attempt in 1 2; do
    now=$SECONDS; left=$((end - now))
    [ $left -lt $MIN ] && { note "$tree: attempt $attempt not started, ${left}s left"; break; }
    resume=""; [ $attempt -gt 1 ] && resume="--resume"
    from=$(( $(wc -l < "$LOG") + 1 ))
    note "$tree ($label, $src): bench_perf.py, ${left}s"
    BENCH_DITPASS_SRC=$(cd "$src" && pwd) DITPASS_COMMIT=$label TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_$tree \
      timeout --kill-after=8 $((left - 3)) python3 -m torch.distributed.run --standalone --nproc_per_node=$GPUS \
      "$script" --deadline-at $(( $(date +%s) + left - GRACE - 10 )) --grace $GRACE --est-scale $EST \
      --out "$part" $resume \
      "${ARGS[@]}" >> "$LOG" 2>&1
    rc=$?
    note "$tree: exit $rc"
    tail -n +$from "$LOG" | grep -E '^\[[0-9:]+ |^\[[0-9:]+\] watchdog|Error|OutOfMemory' | grep -v '^\[arch' \
      | cut -c1-240 | tail -40
    tail -n +$from "$LOG" | grep -q '^\[[0-9:]*\] watchdog' && [ $attempt -eq 1 ] || break
    note "$tree: watchdog ended the invocation; resuming after the hung measurement"
  done
  [ -f "$part" ] && cat "$part" >> "$JSONL" && rm -f "$part"
done
wait $ENV_PID 2>/dev/null
note "all invocations done"
python3 benchmarks/compare_arch.py "$JSONL" --out "$OUT/compare_arch.md" || note "compare_arch.py failed"
