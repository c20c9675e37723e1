#!/usr/bin/env bash
# Takes one part out of a topology started by up.sh (scaling a tier in, or
# the first half of replacing it), without losing what it is doing:
# - a gateway leaves haproxy first (a seamless reload), then drains on
#   SIGTERM: its clients reconnect through the balancer to the others;
# - a worker drains on SIGTERM: the broker gives it nothing new, what it
#   runs (a VM launch) finishes, then it exits.
# Returns once the process has exited: SIGKILL after --wait seconds (default
# 15: a worker's --drain-timeout is 10 s, a gateway's 5 s).
#   deploy/local/remove.sh NAME [--run-dir DIR] [--wait SECONDS]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
name=${1:?name: a part up.sh or add.sh started (gw2, vm1, worker-chat, ...)}; shift
run_dir="$here/run" wait_s=15
while (( $# )); do
  case "$1" in
    --run-dir) run_dir=$2; shift 2 ;;
    --wait) wait_s=$2; shift 2 ;;
    *) echo "remove.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ -f $run_dir/env ]] || { echo "remove.sh: no topology in $run_dir (run up.sh)" >&2; exit 1; }
# shellcheck source=/dev/null
source "$run_dir/env"
# shellcheck source=lib.sh
source "$here/lib.sh"
[[ $name != broker && $name != broker-b ]] || { echo "remove.sh: the broker is not removed (down.sh stops everything)" >&2; exit 2; }
pid=$(awk -v n="$name" '$1 == n {print $2}' "$run_dir/pids")
[[ -n $pid ]] || { echo "remove.sh: no running part named $name in $run_dir" >&2; exit 1; }

if grep -q "^$name " "$run_dir/gateways" 2>/dev/null; then
  (( $(wc -l < "$run_dir/gateways") > 1 )) || { echo "remove.sh: $name is the last gateway" >&2; exit 1; }
  # Out of the balancer before it drains: no new client is sent to it.
  grep -v "^$name " "$run_dir/gateways" > "$run_dir/gateways.new" && mv "$run_dir/gateways.new" "$run_dir/gateways"
  start_balancer
fi
kill -TERM "$pid" 2>/dev/null || true
for _ in $(seq $(( wait_s * 10 ))); do
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
how=drained
if kill -0 "$pid" 2>/dev/null; then
  kill -KILL "$pid" 2>/dev/null || true
  how="killed after ${wait_s} s"
fi
grep -v "^$name " "$run_dir/pids" > "$run_dir/pids.new" && mv "$run_dir/pids.new" "$run_dir/pids"
echo "$name: $how"
