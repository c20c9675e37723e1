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
count() { grep -c "^$1" "$run_dir/pids" || true; }
worker() { # NAME SERVICE...
  local name=$1; shift
  local args=()
  for s in "$@"; do args+=(--service "$s"); done
  start "$name" "$BIN/sidecast-worker" "${args[@]}" --id "$name" --broker "$ROUTER" --publish "$XSUB" \
    --chat-db "$run_dir/chat.db" --vm-launch-ms "$VM_LAUNCH_MS" --vm-failure-rate "$VM_FAILURE_RATE"
}

write_haproxy() {
  local cfg=$run_dir/haproxy.cfg
  {
    cat <<CFG
global
  maxconn 8000
  pidfile $run_dir/haproxy.pid
defaults
  mode http
  timeout connect 5s
  timeout client 90s
  timeout server 90s
  timeout tunnel 1h
  option http-server-close
frontend sidecast
  bind 127.0.0.1:$PORT
CFG
    if [[ $BALANCER == sid ]]; then
      cat <<'CFG'
  # A sid is "<gateway id>.<random>": requests for a sid go to its gateway
  # (an HTTP API session's sid is in the path: /api/v1/sessions/<sid>/...);
  # handshakes (no sid) are spread round-robin.
  acl has_sid url_param(sid) -m found
  acl api_sid path_beg /api/v1/sessions/
  use_backend gw_%[url_param(sid),field(1,.)] if has_sid
  use_backend gw_%[path,field(5,/),field(1,.)] if api_sid
CFG
    fi
    echo "  default_backend gateways"
    echo "backend gateways"
    echo "  balance roundrobin"
    # send-proxy-v2: each connection names its client (PROXY protocol), so
    # the gateways' per-address limits count clients, not the balancer.
    while read -r id gport; do echo "  server $id 127.0.0.1:$gport check send-proxy-v2"; done < "$run_dir/gateways"
    while read -r id gport; do
      printf 'backend gw_%s\n  server %s 127.0.0.1:%s send-proxy-v2\n' "$id" "$id" "$gport"
    done < "$run_dir/gateways"
  } > "$cfg"
  haproxy -c -q -f "$cfg"
}

start_balancer() {
  write_haproxy
  local old=""
  [[ -f $run_dir/haproxy.pid ]] && old=$(cat "$run_dir/haproxy.pid")
  if [[ -n $old ]] && kill -0 "$old" 2>/dev/null; then
    # Seamless reload: the new process takes the port, the old one finishes its connections.
    setsid haproxy -f "$run_dir/haproxy.cfg" -D -sf "$old" > "$run_dir/balancer.log" 2>&1 < /dev/null
  else
    setsid haproxy -f "$run_dir/haproxy.cfg" -D > "$run_dir/balancer.log" 2>&1 < /dev/null
  fi
  wait_healthy "http://127.0.0.1:$PORT/healthz" balancer || exit 1
}

case "$part" in
  gateway)
    n=$(( $(count gw) + 1 ))
    id=gw$n gport=$(free_ports 1)
    start "$id" "$BIN/sidecast-gateway" --gateway-id "$id" --http "127.0.0.1:$gport" --broker "$ROUTER" \
      --events "$XPUB" --api-key "$API_KEY" --proxy-protocol-from 127.0.0.1
    wait_healthy "http://127.0.0.1:$gport/healthz" "$id" || exit 1
    echo "$id $gport" >> "$run_dir/gateways"
    if (( reload )); then start_balancer; fi
    echo "$id http://127.0.0.1:$gport"
    ;;
  vm) worker "vm$(( $(count vm) + 1 ))" vm ;;
  worker-demo) worker worker-demo demo ;;
  worker-chat) worker worker-chat chat ;;
  balancer) start_balancer ;;
  *) echo "add.sh: unknown part $part" >&2; exit 2 ;;
esac
