# Shared by up.sh and add.sh (sourced, not run).
# free_ports N: N distinct free loopback ports (tools/free-ports).
free_ports() { "$(dirname "${BASH_SOURCE[0]}")/../../tools/free-ports" "$1"; }
# start NAME CMD...: runs CMD detached, logs to $run_dir/NAME.log, records "NAME PID".
start() {
  local name=$1; shift
  setsid "$@" > "$run_dir/$name.log" 2>&1 < /dev/null &
  echo "$name $!" >> "$run_dir/pids"
}
healthy() { /usr/bin/python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=1)" "$1" 2>/dev/null; }
# wait_healthy URL NAME: up to 15 s for URL to answer 2xx; otherwise says so and fails.
wait_healthy() {
  for _ in $(seq 150); do healthy "$1" && return 0; sleep 0.1; done
  echo "$(basename "$0"): $2 did not become healthy ($1); see $run_dir/$2.log" >&2
  return 1
}
