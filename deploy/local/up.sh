#!/usr/bin/env bash
# Starts the scaled-out topology as plain processes on this host:
# sidecast-broker, N gateways, the demo, chat and vm workers (two vm workers),
# and haproxy in front of the gateways on --port. Returns once every part is
# healthy, prints the URL, and keeps PIDs, ports and logs in the run dir.
#
#   deploy/local/up.sh --port PORT [--gateways N] [--balancer sid|roundrobin]
#                      [--pair] [--run-dir DIR] [--vm-launch-ms MS] [--vm-failure-rate R]
#   deploy/local/add.sh gateway|vm [--run-dir DIR]    # scale a tier while it runs
#   deploy/local/remove.sh NAME [--run-dir DIR]       # drain and stop one part (gw2, vm1, ...)
#   deploy/local/down.sh [--run-dir DIR]
#
# --balancer sid (default) sends polling requests and upgrades for a sid to
# the gateway named by the sid's prefix and spreads new handshakes round-robin;
# roundrobin ignores the sid (the gateways relay foreign sids to their owner).
# --pair runs two brokers as a primary/backup pair (broker, broker-b; see
# docs/deployment.md, "A broker pair"): every gateway and worker knows both.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
port="" gateways=2 balancer=sid run_dir="$here/run" vm_launch_ms=4000 vm_failure_rate=0.1 pair=0
while (( $# )); do
  case "$1" in
    --port) port=$2; shift 2 ;;
    --gateways) gateways=$2; shift 2 ;;
    --balancer) balancer=$2; shift 2 ;;
    --pair) pair=1; shift ;;
    --run-dir) run_dir=$2; shift 2 ;;
    --vm-launch-ms) vm_launch_ms=$2; shift 2 ;;
    --vm-failure-rate) vm_failure_rate=$2; shift 2 ;;
    -h|--help) sed -n 2,19p "$0"; exit 0 ;;
    *) echo "up.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ -n $port ]] || { echo "up.sh: --port PORT is required" >&2; exit 2; }
[[ $balancer == sid || $balancer == roundrobin ]] || { echo "up.sh: --balancer sid|roundrobin" >&2; exit 2; }
bin=${SIDECAST_BIN:-$root/build/bin}
for b in sidecast-broker sidecast-gateway sidecast-worker; do
  [[ -x $bin/$b ]] || { echo "up.sh: $bin/$b missing: build first (cmake --build build)" >&2; exit 1; }
done
command -v haproxy >/dev/null || { echo "up.sh: haproxy missing (apt-get install haproxy)" >&2; exit 1; }
[[ -x /usr/bin/python3 ]] || { echo "up.sh: /usr/bin/python3 missing (apt-get install python3): it picks free ports and checks health" >&2; exit 1; }
if [[ -f $run_dir/pids ]]; then echo "up.sh: $run_dir holds a running topology; run down.sh first" >&2; exit 1; fi
mkdir -p "$run_dir"
: > "$run_dir/pids"
: > "$run_dir/names"

# shellcheck source=lib.sh
source "$here/lib.sh"
fail() { "$here/down.sh" --run-dir "$run_dir" >&2; exit 1; }

# The broker's four ports (and, of a pair, the backup's four and the two
# brokers' pair ports); none may be the balancer's, which is not bound yet.
picked=()
for p in $(free_ports 11); do if [[ $p != "$port" ]]; then picked+=("$p"); fi; done
cat > "$run_dir/env" <<ENV
ROUTER=tcp://127.0.0.1:${picked[0]}
XSUB=tcp://127.0.0.1:${picked[1]}
XPUB=tcp://127.0.0.1:${picked[2]}
BROKER_HTTP=127.0.0.1:${picked[3]}
PORT=$port
BALANCER=$balancer
API_KEY=${SIDECAST_API_KEY:-local-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')}
VM_LAUNCH_MS=$vm_launch_ms
VM_FAILURE_RATE=$vm_failure_rate
BIN=$bin
PAIR=$pair
ENV
if (( pair )); then
  cat >> "$run_dir/env" <<ENV
BACKUP_ROUTER=tcp://127.0.0.1:${picked[4]}
BACKUP_XSUB=tcp://127.0.0.1:${picked[5]}
BACKUP_XPUB=tcp://127.0.0.1:${picked[6]}
BACKUP_HTTP=127.0.0.1:${picked[7]}
PAIR_PRIMARY=tcp://127.0.0.1:${picked[8]}
PAIR_BACKUP=tcp://127.0.0.1:${picked[9]}
ENV
fi
# shellcheck source=/dev/null
source "$run_dir/env"

if (( pair )); then
  start broker "$bin/sidecast-broker" --id broker --router "$ROUTER" --xsub "$XSUB" --xpub "$XPUB" \
    --http "$BROKER_HTTP" --pair primary --pair-bind "$PAIR_PRIMARY" --pair-connect "$PAIR_BACKUP"
  start broker-b "$bin/sidecast-broker" --id broker-b --router "$BACKUP_ROUTER" --xsub "$BACKUP_XSUB" \
    --xpub "$BACKUP_XPUB" --http "$BACKUP_HTTP" --pair backup --pair-bind "$PAIR_BACKUP" --pair-connect "$PAIR_PRIMARY"
  wait_healthy "http://$BACKUP_HTTP/healthz" broker-b || fail
else
  start broker "$bin/sidecast-broker" --router "$ROUTER" --xsub "$XSUB" --xpub "$XPUB" --http "$BROKER_HTTP"
fi
wait_healthy "http://$BROKER_HTTP/healthz" broker || fail
for part in worker-demo worker-chat vm vm; do "$here/add.sh" "$part" --run-dir "$run_dir" || fail; done
for _ in $(seq "$gateways"); do "$here/add.sh" gateway --run-dir "$run_dir" --no-reload || fail; done
"$here/add.sh" balancer --run-dir "$run_dir" || fail
echo "sidecast: http://127.0.0.1:$port/  ($gateways gateways behind haproxy, balancer=$balancer$( (( pair )) && echo ", a broker pair"); run dir $run_dir)"
