# Shared by up.sh and add.sh (sourced, not run).
# free_ports N: N distinct free loopback ports (tools/free-ports).
free_ports() { "$(dirname "${BASH_SOURCE[0]}")/../../tools/free-ports" "$1"; }
# start NAME CMD...: runs CMD detached, logs to $run_dir/NAME.log, records
# "NAME PID" in pids (what runs) and NAME in names (what ever ran).
start() {
  local name=$1; shift
  setsid "$@" > "$run_dir/$name.log" 2>&1 < /dev/null &
  echo "$name $!" >> "$run_dir/pids"
  echo "$name" >> "$run_dir/names"
}
healthy() { /usr/bin/python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=1)" "$1" 2>/dev/null; }
# wait_healthy URL NAME: up to 15 s for URL to answer 2xx; otherwise says so and fails.
wait_healthy() {
  for _ in $(seq 150); do healthy "$1" && return 0; sleep 0.1; done
  echo "$(basename "$0"): $2 did not become healthy ($1); see $run_dir/$2.log" >&2
  return 1
}

# The balancer (add.sh, remove.sh): haproxy.cfg from the gateways file, then
# haproxy started, or reloaded seamlessly when it runs.
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
  # Operators' pages stay on the private network: each gateway's own port.
  # Decoded first: the gateway decodes the path (/%6detrics is /metrics).
  http-request deny if { path,url_dec -m beg /metrics }
CFG
    if [[ $BALANCER == sid ]]; then
      cat <<'CFG'
  # A sid is "<gateway id>.<random>": requests for a sid go to its gateway
  # (an HTTP API session's sid, or a socket's the sockets API acts on, is in
  # the path: /api/v1/sessions/<session key>/..., /api/v1/sockets/<sid>/...);
  # handshakes (no sid) are spread round-robin.
  acl has_sid url_param(sid) -m found
  acl api_sid path_beg /api/v1/sessions/ /api/v1/sockets/
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
