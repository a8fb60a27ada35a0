#!/bin/bash
# Run bench_perf.py for several world sizes one after another, from the repository root, on one host,
# then write the table and the plot (plot_perf.py).
#   WORLDS="4 2 1" BENCH_DEADLINE=570 bash benchmarks/run_perf.sh [bench_perf.py args, e.g. --res 1024 2048]
# Records go to $OUT (default benchmarks/results/raw): perf_w<N>.jsonl, log_w<N>.txt, env.txt,
# perf_flux.md, perf_flux.png. BENCH_DEADLINE (seconds, default 3600) is for the whole script: each world
# size gets what is left; bench_perf.py stops starting measurements BENCH_MARGIN (default 45) seconds
# before that and records the rest as skipped. When a measurement hangs, bench_perf.py's watchdog records
# it and ends that invocation; this script then resumes the same world size once (--resume) if time is left.
# Without diffusers or xfuser installed, the wheels in .whl/ are installed into /tmp/site first.
set -u
OUT=${OUT:-benchmarks/results/raw}
export OUT
mkdir -p "$OUT"
if ! python3 -c 'import importlib.util as u, sys; sys.exit(0 if u.find_spec("diffusers") and u.find_spec("xfuser") else 1)' 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    SITE=${BENCH_SITE:-/tmp/site}
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      || echo "warning: the wheels in .whl/ did not all install"
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  fi
  python3 -c 'import diffusers' 2>/dev/null || { echo "diffusers missing (and no usable .whl/)"; exit 1; }
fi
# NVLink multicast stays off (shared machines); unbuffered output for the logs
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export BENCH_RUN_ID=${BENCH_RUN_ID:-$(date -u +%Y%m%dT%H%M%S)-$RANDOM}
DEADLINE=${BENCH_DEADLINE:-3600}
MARGIN=${BENCH_MARGIN:-45}
{ nvidia-smi; nvidia-smi topo -m; python3 -c 'import torch, diffusers; print(torch.__version__, torch.version.cuda, torch.cuda.device_count(), diffusers.__version__)';
  python3 -c 'import importlib.metadata as m
for p in ("xfuser", "yunchang", "distvae", "triton", "flash_attn"):
    try: print(p, m.version(p))
    except Exception as e: print(p, "not installed")'; lscpu | head -20; } > "$OUT/env.txt" 2>&1
echo "run $BENCH_RUN_ID"
for w in ${WORLDS:-4 2 1}; do
  for attempt in 1 2; do
    left=$((DEADLINE - SECONDS))
    if [ $left -lt $((MARGIN + 30)) ]; then echo "world $w: not run, ${left}s left"; break; fi
    resume=""; [ $attempt -gt 1 ] && resume="--resume"
    from=$(( $(cat "$OUT/log_w$w.txt" 2>/dev/null | wc -l) + 1 ))
    timeout --kill-after=15 $left python3 -m torch.distributed.run --standalone --nproc_per_node=$w \
      benchmarks/bench_perf.py --deadline-at $(( $(date +%s) + left - MARGIN )) $resume "$@" >> "$OUT/log_w$w.txt" 2>&1
    rc=$?
    echo "world $w: exit $rc after ${SECONDS}s"
    tail -n +$from "$OUT/log_w$w.txt" | grep -E '^\[[0-9:]+ |^\[[0-9:]+\] watchdog|^torch.distributed.*Error|OutOfMemory' \
      | cut -c1-300 | tail -60
    # resume once only after a watchdog exit (a hang); other failures are in the log and the records
    tail -n +$from "$OUT/log_w$w.txt" | grep -q '^\[[0-9:]*\] watchdog' && [ $attempt -eq 1 ] || break
    echo "world $w: watchdog ended the invocation; resuming after the hung measurement"
  done
done
python3 benchmarks/plot_perf.py "$OUT"/perf_w*.jsonl --out-dir "$OUT" || echo "plot_perf.py failed"
