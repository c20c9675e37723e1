#!/usr/bin/env bash
# Stops a topology started by up.sh: SIGTERM to every process it started (by
# PID), SIGKILL to what is still there after 5 s. Keeps the logs.
#   deploy/local/down.sh [--run-dir DIR]
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
run_dir="$here/run"
while (( $# )); do
  case "$1" in
    --run-dir) run_dir=$2; shift 2 ;;
    *) echo "down.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
pids=()
[[ -f $run_dir/haproxy.pid ]] && pids+=($(cat "$run_dir/haproxy.pid"))
[[ -f $run_dir/pids ]] && pids+=($(awk '{print $2}' "$run_dir/pids"))
for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
# Up to 12 s: a worker drains for up to --drain-timeout (10 s) first.
for _ in $(seq 120); do
  alive=0
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
  (( alive )) || break
  sleep 0.1
done
for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null; done
rm -f "$run_dir/pids" "$run_dir/names" "$run_dir/haproxy.pid" "$run_dir/gateways"
echo "sidecast: stopped (logs in $run_dir)"
