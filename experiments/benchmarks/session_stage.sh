# Sourced by kernels_gpu_session.sh and kernels_tpu_session.sh: runs one stage of a
# prepared device session. Needs OUT, DEADLINE and START (date +%s at the start) set.
#
#   stage NAME LIMIT_SECONDS COMMAND...
#
# The stage runs in its own process under `timeout` (a failure or hang in one does not
# stop the others), writes $OUT/NAME.log and prints its status and the log's tail
# (TAIL lines, default 25). Its limit is shortened, or the stage skipped, so that it
# ends before DEADLINE seconds from START.
stage() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - ($(date +%s) - START) - 5))
  if ((left < 20)); then
    echo "=== $name: skipped (${left}s left before the deadline)"
    return
  fi
  ((limit > left)) && limit=$left
  local began
  began=$(date +%s)
  timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc $rc in $(($(date +%s) - began))s (limit ${limit}s): $*"
  tail -n "${TAIL:-25}" "$OUT/$name.log" | cut -c1-400
}
