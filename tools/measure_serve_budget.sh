#!/bin/bash
# `mlx-flash serve` under a real memory limit of its base RSS + budget + 5% (cgroup v1, root):
# a short unlimited run learns the base and the budget from /health, then the limited run takes
# REQUESTS requests from THREADS client threads (tools/load_serve.py) and prints the cgroup's
# peak and failcnt and the model's part (peak RSS less the base) against the budget.
#   tools/measure_serve_budget.sh models/SmolLM2-135M-Instruct-flash 60%model
set -u
MODEL=${1:?model dir}; MEMORY=${2:-60%model}; PORT=${PORT:-18123}
REQUESTS=${REQUESTS:-24}; THREADS=${THREADS:-8}; CONTEXT=${CONTEXT:-512}
PY=${PY:-.venv/bin/python}; FLASH=${FLASH:-.venv/bin/mlx-flash}
run() {  # $1: the limit in bytes, 0 for none; $2: requests
  local group=/sys/fs/cgroup/memory/mlx-flash-serve-$$
  mkdir -p "$group"
  [ "$1" != 0 ] && echo "$1" > "$group/memory.limit_in_bytes"
  sh -c 'echo $$ > "$0" && exec "$@"' "$group/cgroup.procs" "$FLASH" serve --model "$MODEL" \
    --memory "$MEMORY" --max-context "$CONTEXT" --port "$PORT" > /tmp/mlx-flash-serve.log 2>&1 &
  for _ in $(seq 300); do curl -sf "127.0.0.1:$PORT/health" > /dev/null && break; sleep 1; done
  "$PY" tools/load_serve.py --url "http://127.0.0.1:$PORT" --requests "$2" --threads "$THREADS" | tail -4
  curl -sf "127.0.0.1:$PORT/health" > /tmp/mlx-flash-health.json
  echo "cgroup peak $(cat "$group/memory.max_usage_in_bytes") failcnt $(cat "$group/memory.failcnt")"
  kill %1; wait
  rmdir "$group"
  "$PY" - <<'PY'
import json
h = json.load(open("/tmp/mlx-flash-health.json"))
part = h["peak_rss_bytes"] - h["base_rss_bytes"]
print(f"budget {h['memory_budget_bytes']} base {h['base_rss_bytes']} model part {part} "
      f"({part / h['memory_budget_bytes']:.3f} of the budget) requests {h['requests']}")
PY
}
run 0 2
LIMIT=$("$PY" -c "import json; h = json.load(open('/tmp/mlx-flash-health.json')); print(int(h['base_rss_bytes'] + 1.05 * h['memory_budget_bytes']))")
echo "limit $LIMIT"
run "$LIMIT" "$REQUESTS"
