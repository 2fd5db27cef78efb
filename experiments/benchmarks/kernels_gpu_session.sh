#!/usr/bin/env bash
# Every GPU check of the Pallas kernels in one prepared run, for a short lease of a GPU machine.
#
#   OUT=runs/kernels_gpu DEADLINE=400 bash experiments/benchmarks/kernels_gpu_session.sh
#   OUT=... bash experiments/benchmarks/kernels_gpu_session.sh flash_sweep scan_sweep
#
# Stages (default: env gpu_tests flash_mosaic decode_mosaic scan_mosaic flash_backward flash_speed
# scan_sweep flash_sweep scan decode flash_ablation flash_launch decode_gqa decode_f32, what the
# last run left unmeasured first):
#   env          GPU, driver, jax / jaxlib / Triton versions
#   gpu_tests    tests/kernels/test_kernels_on_gpu.py: compiled kernels vs float64 references
#   flash        kernels_flash_attention.py: correctness and the speed table vs XLA and cuDNN
#   flash_speed  the speed table alone
#   scan         kernels_selective_scan.py: correctness and speed vs the XLA scans
#   decode       kernels_decode_attention.py: split-K decode vs XLA, full caches
#   decode_gqa   the same, 4 query heads per kv head, ragged cache lengths
#   decode_f32   full caches in float32 (implementation=None keeps XLA there until timed)
#   flash_sweep  flash-attention block sizes at L 4096
#   flash_launch flash-attention warps / stages at L 4096, around the default blocks
#   flash_ablation  the kernel against itself with the element mask on every block pair
#   flash_backward  forward + backward with the fused backward (atomic dq) against the default
#   flash_mosaic the Mosaic GPU forward (four block shapes) against the Triton forward and cuDNN
#   decode_mosaic the Mosaic GPU decode kernel beside the Triton one, full caches
#   scan_mosaic  the selective scan with every kernel on Mosaic GPU beside the Triton kernel
#   scan_sweep   selective-scan defaults and their untimed neighbours (blocks, chunks, warps)
# Each stage runs in its own process under `timeout` (a failure or hang in one does not
# stop the others), writes $OUT/<stage>.log and prints its status and the log's tail
# (session_stage.sh). DEADLINE (seconds from the start, default 540) shortens or skips
# the stages that would run past it, so the whole run ends inside the lease's command
# limit. kernels_tpu_session.sh is the same for a TPU.
set -u
OUT=${OUT:-runs/kernels_gpu}
DEADLINE=${DEADLINE:-540}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
# cpu too: the benchmarks run their float64 references on the host (kernel_baselines.py).
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda,cpu
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BENCH=experiments/benchmarks
START=$(date +%s)

# shellcheck source=experiments/benchmarks/session_stage.sh
source "$BENCH/session_stage.sh"

run_stage() {
  case $1 in
  env) stage env 60 bash -c "nvidia-smi; $PY -m pip list 2>/dev/null | grep -i -E '^(jax|triton)'; \
$PY -c 'import jax, jaxlib; print(jax.__version__, jaxlib.__version__, jax.devices()); \
assert jax.default_backend() == \"gpu\", \"JAX fell back to \" + jax.default_backend()'" ;;
  gpu_tests) stage gpu_tests 150 "$PY" -m pytest -q -s -rfE -p no:cacheprovider \
    tests/kernels/test_kernels_on_gpu.py ;;
  flash) stage flash 150 "$PY" $BENCH/kernels_flash_attention.py --repeats 10 ;;
  flash_speed) stage flash_speed 120 "$PY" $BENCH/kernels_flash_attention.py --repeats 10 \
    --skip-correctness ;;
  scan) stage scan 120 "$PY" $BENCH/kernels_selective_scan.py --reps 10 ;;
  decode) stage decode 90 "$PY" $BENCH/kernels_decode_attention.py --caches 4096,32768 \
    --batches 1,8 --heads 8,32 --repeats 10 ;;
  decode_gqa) stage decode_gqa 60 "$PY" $BENCH/kernels_decode_attention.py --caches 32768 \
    --batches 1,8 --heads 32 --group 4 --ragged --repeats 10 ;;
  decode_f32) stage decode_f32 60 "$PY" $BENCH/kernels_decode_attention.py --caches 4096,32768 \
    --batches 1,8 --heads 8 --dtype float32 --repeats 10 ;;
  flash_sweep) stage flash_sweep 200 "$PY" $BENCH/kernels_flash_attention.py --repeats 5 \
    --skip-correctness --skip-speed --sweep ;;
  flash_launch) stage flash_launch 120 "$PY" $BENCH/kernels_flash_attention.py --repeats 5 \
    --skip-correctness --skip-speed --sweep-launch ;;
  flash_ablation) stage flash_ablation 90 "$PY" $BENCH/kernels_flash_attention.py --repeats 10 \
    --skip-correctness --skip-speed --ablate-schedules ;;
  flash_backward) stage flash_backward 90 "$PY" $BENCH/kernels_flash_attention.py --repeats 10 \
    --skip-correctness --skip-speed --ablate-backward ;;
  flash_mosaic) stage flash_mosaic 150 "$PY" $BENCH/kernels_flash_attention.py --repeats 10 \
    --skip-correctness --skip-speed --mosaic-forward ;;
  decode_mosaic) stage decode_mosaic 90 "$PY" $BENCH/kernels_decode_attention.py --caches 4096,32768 \
    --batches 1,8 --heads 8,32 --repeats 10 --mosaic ;;
  scan_mosaic) stage scan_mosaic 90 "$PY" $BENCH/kernels_selective_scan.py --reps 10 \
    --skip-correctness --implementations pallas pallas_mosaic_gpu associative ;;
  scan_sweep) stage scan_sweep 150 "$PY" $BENCH/kernels_selective_scan.py --reps 5 \
    --skip-correctness --skip-speed --sweep ;;
  *) echo "unknown stage $1" >&2 && exit 2 ;;
  esac
}

STAGES=("$@")
# What the last GPU run (experiments/benchmarks/README.md) left unmeasured first.
((${#STAGES[@]})) ||
  STAGES=(env gpu_tests flash_mosaic decode_mosaic scan_mosaic flash_backward flash_speed
    scan_sweep flash_sweep scan decode flash_ablation flash_launch decode_gqa decode_f32)
for name in "${STAGES[@]}"; do run_stage "$name"; done
echo "=== total $(($(date +%s) - START))s"
