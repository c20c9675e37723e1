#!/usr/bin/env bash
# Adds one part to a topology started by up.sh (scaling a tier while it
# runs), or (re)starts the balancer. Parts: gateway, vm, worker-demo,
# worker-chat, balancer. A new gateway is put behind haproxy with a
# seamless reload (haproxy -sf), without restarting anything else.
#   deploy/local/add.sh PART [--run-dir DIR] [--no-reload]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
part=${1:?part: gateway, vm, worker-demo, worker-chat or balancer}; shift
run_dir="$here/run" reload=1
while (( $# )); do
  case "$1" in
    --run-dir) run_dir=$2; shift 2 ;;
    --no-reload) reload=0; shift ;;
    *) echo "add.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ -f $run_dir/env ]] || { echo "add.sh: no topology in $run_dir (run up.sh)" >&2; exit 1; }
# shellcheck source=/dev/null
source "$run_dir/env"
# shellcheck source=lib.sh
source "$here/lib.sh"
# The next number for PREFIX: never one a part that ran had (remove.sh),
# so a gateway's sids or a worker's jobs are never taken for a newcomer's.
next_number() { echo $(( $(grep -c "^$1[0-9]" "$run_dir/names" 2>/dev/null || true) + 1 )); }
# Of a broker pair (up.sh --pair), every gateway and worker knows both brokers.
backup_worker=() backup_gateway=()
if [[ ${PAIR:-0} == 1 ]]; then
  backup_worker=(--backup-broker "$BACKUP_ROUTER" --backup-publish "$BACKUP_XSUB")
  backup_gateway=(--backup-broker "$BACKUP_ROUTER" --backup-events "$BACKUP_XPUB")
fi
worker() { # NAME SERVICE...
  local name=$1; shift
  local args=("${backup_worker[@]}")
  for s in "$@"; do args+=(--service "$s"); done
  start "$name" "$BIN/sidecast-worker" "${args[@]}" --id "$name" --broker "$ROUTER" --publish "$XSUB" \
    --chat-db "$run_dir/chat.db" --vm-launch-ms "$VM_LAUNCH_MS" --vm-failure-rate "$VM_FAILURE_RATE"
}

case "$part" in
  gateway)
    id=gw$(next_number gw) gport=$(free_ports 1)
    start "$id" "$BIN/sidecast-gateway" --gateway-id "$id" --http "127.0.0.1:$gport" --broker "$ROUTER" \
      --events "$XPUB" --api-key "$API_KEY" --proxy-protocol-from 127.0.0.1 "${backup_gateway[@]}"
    wait_healthy "http://127.0.0.1:$gport/healthz" "$id" || exit 1
    echo "$id $gport" >> "$run_dir/gateways"
    if (( reload )); then start_balancer; fi
    echo "$id http://127.0.0.1:$gport"
    ;;
  vm) worker "vm$(next_number vm)" vm ;;
  worker-demo) worker worker-demo demo ;;
  worker-chat) worker worker-chat chat ;;
  balancer) start_balancer ;;
  *) echo "add.sh: unknown part $part" >&2; exit 2 ;;
esac
