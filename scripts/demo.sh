#!/usr/bin/env bash
# Starts three stand-in API servers and extractedprism in front of them on
# 127.0.0.1:7445 (admin on 7446). Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-bin}
CONFIG=${CONFIG:-configs/demo.yaml}
pids=()
cleanup() {
  trap - INT TERM EXIT
  echo
  echo "stopping demo..."
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup INT TERM EXIT

for port in 16443 16444 16445; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    echo "port $port is already in use; stop whatever holds it (another demo?)" >&2
    exit 1
  fi
done

names=(a b c)
i=0
for port in 16443 16444 16445; do
  "$BIN/standin" --listen "127.0.0.1:$port" --name "apiserver-${names[$i]}" >/dev/null 2>&1 &
  pids+=($!)
  echo "stand-in apiserver-${names[$i]}: https://127.0.0.1:$port (pid $!)"
  i=$((i + 1))
done

"$BIN/extractedprism" --config "$CONFIG" &
pids+=($!)
ep=$!

for _ in $(seq 1 100); do
  if curl -fsS -o /dev/null http://127.0.0.1:7446/readyz 2>/dev/null; then break; fi
  if ! kill -0 "$ep" 2>/dev/null; then echo "extractedprism exited; see the log above" >&2; exit 1; fi
  sleep 0.1
done

cat <<MSG

extractedprism is ready on https://127.0.0.1:7445 (admin http://127.0.0.1:7446).
Try, in another terminal:

  curl -k https://127.0.0.1:7445/            # answered by one of the stand-ins (see "name")
  bin/extractedprism status                  # the upstream table
  curl http://127.0.0.1:7446/readyz          # readiness, with the reason
  curl -s http://127.0.0.1:7446/metrics | grep ^extractedprism_upstream_healthy
  curl -kN https://127.0.0.1:7445/stream     # a watch-like stream

  kill ${pids[0]}                                # kill apiserver-a: traffic fails over, no client error
  curl -k -X POST https://127.0.0.1:16444/control/unready   # apiserver-b answers /readyz 500: drained
  \$EDITOR $CONFIG                   # edit live: applied within a second

Ctrl-C stops the demo.
MSG
wait "$ep"
