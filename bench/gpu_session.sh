#!/usr/bin/env bash
# One prepared GPU session: environment, CUDA build, CUDA tests, routing and end-to-end
# benchmarks beside the traffic model, an optional Fashion-MNIST run, and a summary, all under
# time limits, with everything that matters left in $OUT (at most 8 files).
#
#   OUT=$(mktemp -d) bash bench/gpu_session.sh              # on a GPU: 8 minutes at most
#   OUT=$(mktemp -d) bash bench/gpu_session.sh --train 120  # plus 120 s of Fashion-MNIST training
#   --budget SECONDS changes the 480 s the steps may take together (--train comes on top).
#
# Without CUDA the same steps run in a reduced form (CPU build, a few interpreter tests, CPU
# timings of tiny cases, no device numbers) so that CI exercises the script; the summary says
# "dry run". A failing or timed-out step is recorded and the script goes on; it exits 0 unless
# $OUT cannot be written. Carried into the device's tree (ignored by git): .gpu-carry/wheels
# (pip wheels the machine lacks, e.g. ninja) and .gpu-carry/fashion-mnist (the IDX files) - see
# the README's "On a GPU" section.
set -uo pipefail
cd "$(dirname "$0")/.."

TRAIN_SECONDS=0
# The whole session's budget: a step never runs past it (a lent GPU gives 15 minutes of device
# time in all, a machine start takes 1-2, and a second run should fit). The dry run on a slow
# shared CPU gets more.
BUDGET_SECONDS=
while [ $# -gt 0 ]; do
  case "$1" in
    --train) TRAIN_SECONDS="$2"; shift 2 ;;
    --budget) BUDGET_SECONDS="$2"; shift 2 ;;
    *) echo "usage: bash bench/gpu_session.sh [--budget SECONDS] [--train SECONDS]" >&2; exit 2 ;;
  esac
done

OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT" || exit 1
LOGS="$OUT/logs"          # packed into logs.tar.gz at the end
mkdir -p "$LOGS"
PY="${PYTHON:-python3}"
STEPS="$LOGS/steps.tsv"   # step, status, seconds
: > "$STEPS"
SESSION_START=$(date +%s)

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  MODE=gpu
else
  MODE=dry
fi
export CAPSNET_FUSED_SESSION_MODE="$MODE"
if [ -z "$BUDGET_SECONDS" ]; then
  BUDGET_SECONDS=480; [ "$MODE" = dry ] && BUDGET_SECONDS=900
fi
echo "gpu_session: mode $MODE, output in $OUT"

DEADLINE=$(( SESSION_START + BUDGET_SECONDS ))

# step NAME SECONDS COMMAND...: run COMMAND under `timeout` (at most until the deadline), log to
# $LOGS/NAME.log, record it; skipped when less than 15 s of the budget is left.
step() {
  local name="$1" limit="$2"; shift 2
  local start=$(date +%s) status
  local left=$(( DEADLINE - start ))
  if [ "$left" -lt 15 ]; then
    printf '%s\t%s\t%s\n' "$name" "skipped(budget)" 0 >> "$STEPS"
    echo "== $name skipped: the session budget is spent"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s)"
  timeout -s INT -k 20 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  status=$?
  case $status in
    0) status=ok ;;
    124|130|137) status="timeout(${limit}s)" ;;
    *) status="failed($status)" ;;
  esac
  local took=$(( $(date +%s) - start ))
  printf '%s\t%s\t%s\n' "$name" "$status" "$took" >> "$STEPS"
  echo "   $status in ${took}s; last lines:"
  tail -n 3 "$LOGS/$name.log" | sed 's/^/   | /'
}

# 1. Environment.
step env 60 "$PY" bench/gpu_session.py env "$OUT"

# 2. Build the extension (CUDA kernels for this GPU's architecture on a GPU), offline.
if [ -d .gpu-carry/wheels ]; then
  step wheels 60 "$PY" -m pip install --no-index --find-links .gpu-carry/wheels \
    --no-deps $(ls .gpu-carry/wheels/*.whl 2>/dev/null)
fi
if [ "$MODE" = gpu ]; then
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
  step build 300 env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
    "$PY" setup.py build_ext --inplace
elif "$PY" -c "import capsnet_fused._C" 2> /dev/null; then
  # A dry run uses the extension the install built (CI: pip install -e); a rebuild in another
  # build folder would recompile everything.
  step build 60 "$PY" -c "import capsnet_fused._C as c; print('already built:', c.__file__)"
else
  step build 300 env CAPSNET_FUSED_CPU_ONLY=1 "$PY" setup.py build_ext --inplace
fi

# 3-6 in order of what matters most if the budget runs out. Each routing benchmark step writes
# its own CSV; the summary merges them into routing.csv.
if [ "$MODE" = gpu ]; then
  # 3. The routing benchmark at B = 128, float32: eager, compiled, triton, cpp.
  step bench_b128 150 "$PY" -m capsnet_fused.cli bench --device cuda --batches 128 \
    --repeats 20 --out-dir "$OUT" --name routing-b128 --no-plot
  # 4. End to end: a CapsNet training step and inference at batch 128 with each backend.
  step bench_e2e 120 "$PY" -m capsnet_fused.cli bench --device cuda --end-to-end \
    --out-dir "$OUT" --name e2e
  # 5. The tests that run on CUDA (every fused backend against the float64 reference, low
  #    precision, opcheck, compile, poisoned outputs); junit XML even when cut short (SIGINT).
  #    Not the emulated CUDA kernels: they run on the CPU, in CI.
  step tests 150 "$PY" -m pytest -q -p no:cacheprovider -k "cuda and not emulated" tests \
    --junitxml="$LOGS/junit.xml"
  # 6. The other batch sizes and bfloat16 (no torch.compile: its compile time per case).
  step bench_batches 90 "$PY" -m capsnet_fused.cli bench --device cuda --batches 8,512 \
    --backends reference,triton,cpp --repeats 20 --out-dir "$OUT" --name routing-batches \
    --no-plot
  step bench_bf16 60 "$PY" -m capsnet_fused.cli bench --device cuda --batches 128 \
    --dtypes bfloat16 --backends reference,triton,cpp --repeats 20 --out-dir "$OUT" \
    --name routing-bf16 --no-plot
else
  step bench_b128 240 "$PY" -m capsnet_fused.cli bench --device cpu --batches 2 \
    --backends reference,cpp --repeats 1 --no-memory --out-dir "$OUT" --name routing-b128 \
    --no-plot
  step bench_e2e 150 "$PY" -m capsnet_fused.cli bench --device cpu --end-to-end \
    --e2e-batch 2 --repeats 1 --backends reference,cpp --out-dir "$OUT" --name e2e
  step tests 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_backends.py \
    -k "triton and (opcheck or deterministic)" --junitxml="$LOGS/junit.xml"
fi

# 7. compute-sanitizer memcheck on one small case of each fused CUDA path, if present.
if [ "$MODE" = gpu ] && command -v compute-sanitizer > /dev/null; then
  step memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$PY" bench/gpu_session.py smoke
else
  step smoke 120 "$PY" bench/gpu_session.py smoke
fi

# 8. Optional: Fashion-MNIST training for a given number of seconds (on top of the budget).
if [ "$TRAIN_SECONDS" -gt 0 ]; then
  DEADLINE=$(( DEADLINE + TRAIN_SECONDS + 60 ))
  DATA=.gpu-carry/fashion-mnist
  [ -d "$DATA" ] || DATA=/usr/share/datasets/fashion-mnist
  DEVICE=cpu; [ "$MODE" = gpu ] && DEVICE=cuda
  step train $(( TRAIN_SECONDS + 60 )) "$PY" bench/gpu_session.py train "$OUT" "$DATA" \
    "$DEVICE" "$TRAIN_SECONDS"
fi

# 9. Summary (printed last) and packing: at most 8 files in $OUT.
printf '%s\t%s\t%s\n' total ok $(( $(date +%s) - SESSION_START )) >> "$STEPS"
"$PY" bench/gpu_session.py summary "$OUT" || echo "summary failed"
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"
echo "gpu_session: files in $OUT:"; ls -la "$OUT"
exit 0
