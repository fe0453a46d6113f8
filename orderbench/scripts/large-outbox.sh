#!/usr/bin/env bash
# The orchestrator on SQLite with an outbox that already holds many events,
# as a system that keeps sent events for days does (OUTBOX_RETENTION_SECS,
# 7 days by default): bytes written and read, and CPU, per saga, read from
# /proc around two runs of `orderbench -n 20000 -c 64` under devstack.
#
#   orderbench/scripts/large-outbox.sh RELEASE_DIR [EVENTS]   (default 1,000,000)
#
# The events are written into a stopped devstack's orchestrator.db with one
# sqlite3 statement (needs the sqlite3 CLI): UUIDv5-shaped random IDs under
# old saga IDs, two per saga, all sent (an unsent backlog is another case:
# the relay's gauges read it every 5 s). Needs port 50051 free.
set -eu
[ $# -ge 1 ] || { echo "usage: $0 RELEASE_DIR [EVENTS]" >&2; exit 2; }
BIN=$1; SAGAS=$(( ${2:-1000000} / 2 ))
dir=$(mktemp -d); pid=
trap '[ -n "$pid" ] && { kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; }; rm -rf "$dir"' EXIT
up() {
  RUST_LOG=warn DATA_DIR=$dir "$BIN/devstack" > "$dir/devstack.log" 2>&1 & pid=$!
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/50051) 2>/dev/null && { sleep 2; return; }; sleep 0.2; done
  echo "devstack did not listen on 50051; its log:" >&2; cat "$dir/devstack.log" >&2; exit 1
}
down() {
  kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=
  for _ in $(seq 1 50); do (exec 3<>/dev/tcp/127.0.0.1/50051) 2>/dev/null || break; sleep 0.2; done
  sleep 1
}
up; down # creates the files and their tables
sqlite3 "$dir/orchestrator.db" "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $SAGAS)
  INSERT INTO outbox (event_id, aggregate_id, sequence, event_type, payload, traceparent, created_at_ms, sent_at_ms, epoch)
  SELECT lower(hex(randomblob(4))) || '-' || lower(hex(randomblob(2))) || '-5' || substr(lower(hex(randomblob(2))), 2)
         || '-' || lower(hex(randomblob(2))) || '-' || lower(hex(randomblob(6))),
         printf('00000000-0000-7000-8000-%012d', i), k, 'order.created', '{}', '',
         now_ms, now_ms, 1
  FROM n, (SELECT 1 AS k UNION ALL SELECT 2),
       (SELECT CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) AS now_ms);
  PRAGMA wal_checkpoint(TRUNCATE);" > /dev/null
echo "outbox: $(sqlite3 "$dir/orchestrator.db" 'SELECT COUNT(*) FROM outbox') events"
up
# The orchestrator is devstack's child that runs the log's writer thread.
orch=$(for c in $(pgrep -P "$pid" || true); do grep -qs saga-log-sqlite /proc/"$c"/task/*/comm && echo "$c"; done | head -1)
[ -n "$orch" ] || { echo "no orchestrator process under devstack ($pid)" >&2; exit 1; }
"$BIN/orderbench" -n 2000 -c 64 > /dev/null 2>&1
field() { awk -v f="$1" '$1 == f":" {print $2}' /proc/"$orch"/io; }
ticks() { awk '{print $14 + $15}' /proc/"$orch"/stat; }
hz=$(getconf CLK_TCK)
for run in 1 2; do
  w0=$(field wchar); r0=$(field rchar); c0=$(ticks)
  "$BIN/orderbench" -n 20000 -c 64 2>/dev/null | grep -E '^(throughput|latency)'
  w1=$(field wchar); r1=$(field rchar); c1=$(ticks)
  echo "run $run: orchestrator wrote $(( (w1 - w0) / 20000 )) B and read $(( (r1 - r0) / 20000 )) B per saga;" \
       "CPU $(awk -v t=$(( c1 - c0 )) -v hz="$hz" 'BEGIN {printf "%.3f", t * 1000 / hz / 20000}') ms per saga"
done
down
