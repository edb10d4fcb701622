#!/usr/bin/env bash
# Start/stop the benchmark Redis (loopback only, no persistence) by pid file.
set -euo pipefail
PORT="${PEERS_REDIS_PORT:-6390}"
STATE="${PEERS_STATE:-/tmp/peers}"
PIDFILE="$STATE/redis.pid"
mkdir -p "$STATE"
case "${1:-}" in
  start)
    if [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      echo "redis already running pid $(cat "$PIDFILE")"; exit 0; fi
    redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no \
      --daemonize no --dir "$STATE" --logfile "$STATE/redis.log" &
    echo $! > "$PIDFILE"
    for _ in $(seq 50); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
    echo "redis started pid $(cat "$PIDFILE") port $PORT: $(redis-cli -p "$PORT" ping)"
    ;;
  stop)
    if [[ -f "$PIDFILE" ]]; then
      pid="$(cat "$PIDFILE")"
      if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
      fi
      rm -f "$PIDFILE"; echo "redis stopped (pid $pid)"
    else echo "no redis pid file"; fi
    ;;
  *) echo "usage: $0 start|stop" >&2; exit 2;;
esac
