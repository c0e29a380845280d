#!/usr/bin/env bash
# Runs one fan-out benchmark against a fresh server.
#
#   bench/run_fanout.sh [SERVER_BINARY] [arqbench options...]
#   bench/run_fanout.sh --subs 100
#   bench/run_fanout.sh build/stub/arqonbus --subs 1000 --msgs 20000
#
# Starts SERVER_BINARY (default build/release/arqonbus) on free ports with the
# file descriptor limit raised to the hard limit and the limits that would stop
# a benchmark from one address (connections per address, the publisher's rate)
# raised to their maxima, runs arqbench (from
# $ARQBENCH, default build/release/arqbench) against it, then prints the
# server's resident memory (near the end of the run and peak) and CPU time,
# and stops it. The server's log goes to a temporary file, printed when
# something fails. Exits with arqbench's status.
set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SERVER=$ROOT/build/release/arqonbus
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then # a first argument that is not an option
  SERVER=$1
  shift
fi
ARQBENCH=${ARQBENCH:-$ROOT/build/release/arqbench}
PY=/usr/bin/python3

for bin in "$SERVER" "$ARQBENCH"; do
  if [ ! -x "$bin" ]; then
    echo "run_fanout: $bin is not built (cmake --build build/release --target arqbench;" \
         "bash build/stub/mk.sh for a stand-in server)" >&2
    exit 2
  fi
done

ulimit -n "$(ulimit -Hn)"

# Three ports the kernel just handed out, released again for the server.
read -r PORT TPORT HPORT < <($PY -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
')

WORK=$(mktemp -d /tmp/arqbench.XXXXXX)
LOG=$WORK/server.log
"$SERVER" --host 127.0.0.1 --port "$PORT" --telemetry-port "$TPORT" --http-port "$HPORT" \
  --max-connections 20000 --max-connections-per-ip 20000 --max-handshakes-per-ip 20000 --rate-limit-messages 1000000 \
  --rate-limit-bytes 1GiB >"$WORK/server.out" 2>"$LOG" &
SPID=$!

stop_server() {
  if kill -0 "$SPID" 2>/dev/null; then
    kill -TERM "$SPID" 2>/dev/null
    for _ in $(seq 100); do
      kill -0 "$SPID" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$SPID" 2>/dev/null
  fi
  wait "$SPID" 2>/dev/null
}
cleanup() {
  stop_server
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Wait until the bus port accepts connections.
for _ in $(seq 100); do
  if $PY -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 0.2).close()" 2>/dev/null; then
    break
  fi
  if ! kill -0 "$SPID" 2>/dev/null; then
    echo "run_fanout: the server exited at start:" >&2
    cat "$LOG" >&2
    exit 2
  fi
  sleep 0.1
done

# utime and stime of the server so far, in seconds.
cpu() {
  awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "user %.2f s, sys %.2f s", $12 / hz, $13 / hz }' \
    "/proc/$SPID/stat"
}
# Busy and total jiffies of the whole machine (all CPUs) from /proc/stat.
machine_cpu() { awk '$1 == "cpu" { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat; }
rss() { awk -v k="$1:" '$1 == k { print $2 " " $3 }' "/proc/$SPID/status"; }

echo "server: $SERVER (pid $SPID, bus port $PORT), RSS at start $(rss VmRSS)"
read -r BUSY0 TOTAL0 < <(machine_cpu)
"$ARQBENCH" --host 127.0.0.1 --port "$PORT" "$@" &
BPID=$!
# Sample the server's RSS while the clients are connected; the last sample
# is taken at most 0.2 s before arqbench ends.
RUN_RSS="?"
while kill -0 "$BPID" 2>/dev/null; do
  R=$(rss VmRSS)
  kill -0 "$BPID" 2>/dev/null && RUN_RSS=$R
  sleep 0.2
done
wait "$BPID"
RC=$?
echo "server RSS: $RUN_RSS near the end of the run, peak $(rss VmHWM), $(rss VmRSS) after the clients left"
read -r BUSY1 TOTAL1 < <(machine_cpu)
echo "server cpu: $(cpu)"
# Other work on the machine skews the numbers; compare this with the server's
# and arqbench's own CPU time.
awk -v b=$((BUSY1 - BUSY0)) -v t=$((TOTAL1 - TOTAL0)) -v n="$(nproc)" -v hz="$(getconf CLK_TCK)" \
  'BEGIN { if (t > 0) printf "machine cpu: %.1f s busy of %.1f s on %d cores (%.0f%%), all processes\n", b / hz, t / hz, n, 100 * b / t }'

stop_server
if [ $RC -ne 0 ]; then
  echo "run_fanout: arqbench failed ($RC); the server's log (last 40 lines):" >&2
  tail -n 40 "$LOG" >&2
fi
exit $RC
