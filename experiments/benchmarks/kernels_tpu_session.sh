#!/usr/bin/env bash
# Every TPU check of the Pallas kernels in one prepared run, for a short lease of a TPU VM
# (or a Colab TPU runtime). No TPU has run it yet: the first run is the first time the
# Mosaic kernels are compiled for, run on and timed on a TPU.
#
#   OUT=runs/kernels_tpu DEADLINE=900 bash experiments/benchmarks/kernels_tpu_session.sh
#   OUT=... bash experiments/benchmarks/kernels_tpu_session.sh flash_sweep scan_sweep
#
# Stages (default: env tpu_tests flash scan decode decode_gqa flash_sweep scan_sweep):
#   env          TPU kind and count, jax / jaxlib / libtpu versions
#   tpu_tests    tests/kernels/test_kernels_on_tpu.py: compiled kernels vs float64 references
#   flash        kernels_flash_attention.py: the compiled Mosaic kernel against float64
#                references (correctness table), then the speed table vs XLA and splash
#                attention (causal and unmasked)
#   scan         kernels_selective_scan.py: correctness and speed vs the XLA scans
#   decode       kernels_decode_attention.py: correctness, split-K decode vs XLA, full caches
#   decode_gqa   the same, 4 query heads per kv head, ragged cache lengths
#   flash_sweep  flash-attention block sizes at L 4096 (forward and backward apart)
#   scan_sweep   selective-scan sequence and channel blocks at the size
# Stages run as in kernels_gpu_session.sh (session_stage.sh): each in its own process
# under `timeout`, logged to $OUT/<stage>.log; DEADLINE (seconds, default 900) skips or
# shortens what would run past it. The defaults the sweeps time are untuned guesses
# (effformer/kernels/README.md); set them from the sweeps' tables.
set -u
OUT=${OUT:-runs/kernels_tpu}
DEADLINE=${DEADLINE:-900}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
# cpu too: the benchmarks run their float64 references on the host (kernel_baselines.py).
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=tpu,cpu
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BENCH=experiments/benchmarks
START=$(date +%s)

# shellcheck source=experiments/benchmarks/session_stage.sh
source "$BENCH/session_stage.sh"

run_stage() {
  case $1 in
  env) stage env 60 bash -c "$PY -m pip list 2>/dev/null | grep -i -E '^(jax|libtpu)'; \
$PY -c 'import jax, jaxlib; print(jax.__version__, jaxlib.__version__, jax.devices()); \
assert jax.default_backend() == \"tpu\", \"JAX fell back to \" + jax.default_backend()'" ;;
  tpu_tests) stage tpu_tests 240 "$PY" -m pytest -q -s -rfE -p no:cacheprovider \
    tests/kernels/test_kernels_on_tpu.py ;;
  flash) stage flash 240 "$PY" $BENCH/kernels_flash_attention.py --repeats 10 ;;
  scan) stage scan 150 "$PY" $BENCH/kernels_selective_scan.py --reps 10 ;;
  decode) stage decode 120 "$PY" $BENCH/kernels_decode_attention.py --caches 4096,32768 \
    --batches 1,8 --heads 8,32 --repeats 10 ;;
  decode_gqa) stage decode_gqa 60 "$PY" $BENCH/kernels_decode_attention.py --caches 32768 \
    --batches 1,8 --heads 32 --group 4 --ragged --repeats 10 ;;
  flash_sweep) stage flash_sweep 240 "$PY" $BENCH/kernels_flash_attention.py --repeats 5 \
    --skip-correctness --skip-speed --sweep ;;
  scan_sweep) stage scan_sweep 150 "$PY" $BENCH/kernels_selective_scan.py --reps 5 \
    --skip-correctness --skip-speed --sweep ;;
  *) echo "unknown stage $1" >&2 && exit 2 ;;
  esac
}

STAGES=("$@")
((${#STAGES[@]})) || STAGES=(env tpu_tests flash scan decode decode_gqa flash_sweep scan_sweep)
for name in "${STAGES[@]}"; do run_stage "$name"; done
echo "=== total $(($(date +%s) - START))s"
