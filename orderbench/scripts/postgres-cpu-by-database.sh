#!/usr/bin/env bash
# One orderbench run on PostgreSQL (the four binaries, one database each on
# 127.0.0.1:5432), then PostgreSQL's CPU per saga split by database: the sum
# of utime+stime of each database's backends, read from /proc before and
# after the run (backends that exit during the run are not counted).
#
#   orderbench/scripts/postgres-cpu-by-database.sh RELEASE_DIR [ORDERS] [CONCURRENCY]
#
# SSLMODE (default disable) is appended to every DATABASE_URL, so runs on a
# server with ssl = on compare like with like. ORDERBENCH picks another
# orderbench binary (default: the one in RELEASE_DIR). Drops and creates the
# bench_* databases; needs ports 50051-50054 free.
#
# It also prints the WAL the server wrote per saga (records, full-page images
# and bytes, from pg_stat_wal): it moves a few percent from run to run of the
# same build (how sagas share commits varies), where CPU time moves ±20 % on
# this machine. The measured run starts right after a CHECKPOINT, so each
# page it changes goes whole into the WAL once (a full-page image), as the
# first change of a page after every checkpoint does in a server that runs.
#
# OUTBOX_EVENTS=N writes N sent events into the orchestrator's outbox before
# the measured run (UUIDv5-shaped random IDs under old saga IDs, two per
# saga, sent now, so the relay's pruning leaves them), as a system that keeps
# sent events for days holds (OUTBOX_RETENTION_SECS, 7 days by default).
#
# When the server preloads pg_stat_statements (shared_preload_libraries), it
# also prints each database's statements per saga: calls and execution time
# (the server's parsing and network work is not in that time), and plans
# made and their time (zero unless pg_stat_statements.track_planning = on).
set -u
[ $# -ge 1 ] || { echo "usage: $0 RELEASE_DIR [ORDERS] [CONCURRENCY]" >&2; exit 2; }
R=$1; N=${2:-4000}; C=${3:-64}
whole() { case $2 in ''|*[!0-9]*) echo "$1 must be a whole number (no separators): '$2'" >&2; exit 2;; esac
  [ ${#2} -le 9 ] || { echo "$1 is too large: $2" >&2; exit 2; }; }
for b in orchestrator stock-svc shipping-svc payment-svc; do
  [ -x "$R/$b" ] || { echo "no $b in $R (a release build's directory)" >&2; exit 2; }; done
whole ORDERS "$N"; whole CONCURRENCY "$C"; whole OUTBOX_EVENTS "${OUTBOX_EVENTS:-0}"
[ "$N" -gt 0 ] && [ "$C" -gt 0 ] || { echo "ORDERS and CONCURRENCY must be above 0" >&2; exit 2; }
ORDERBENCH=${ORDERBENCH:-$R/orderbench}
waitport() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.2; done; return 1; }
# "postgres: 15/main: USER DATABASE HOST(PORT) STATE": ticks per database.
cpu_by_database() {
  for p in $(pgrep -f '^postgres: '); do
    db=$(tr '\0' ' ' < /proc/$p/cmdline 2>/dev/null | awk '{print $4}')
    ticks=$(awk '{print $14+$15}' /proc/$p/stat 2>/dev/null) || continue
    echo "$db $ticks"
  done | awk '{t[$1]+=$2} END {for (d in t) print d, t[d]}' | sort
}
for db in bench_orchestrator bench_stock bench_shipping bench_payment; do
  psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null 2>&1; done
PG=postgres://postgres@127.0.0.1:5432; Q="?sslmode=${SSLMODE:-disable}"
export APPLICATION_API_KEY=dev-key ADMIN_API_KEY=dev-admin-key HOST=127.0.0.1 RUST_LOG=warn
PORT=50052 METRICS_PORT=0 DATABASE_URL=$PG/bench_stock$Q    $R/stock-svc    > /dev/null 2>&1 & p1=$!
PORT=50053 METRICS_PORT=0 DATABASE_URL=$PG/bench_shipping$Q $R/shipping-svc > /dev/null 2>&1 & p2=$!
PORT=50054 METRICS_PORT=0 DATABASE_URL=$PG/bench_payment$Q  $R/payment-svc  > /dev/null 2>&1 & p3=$!
waitport 50052; waitport 50053; waitport 50054
PORT=50051 METRICS_PORT=0 DATABASE_URL=$PG/bench_orchestrator$Q STOCK_SERVICE_URL=http://127.0.0.1:50052 \
  SHIPPING_SERVICE_URL=http://127.0.0.1:50053 PAYMENT_SERVICE_URL=http://127.0.0.1:50054 \
  $R/orchestrator > /dev/null 2>&1 & p4=$!
waitport 50051; sleep 1
$ORDERBENCH -n 300 -c 16 --echo-calls 0 > /dev/null 2>&1   # opens the pools
if [ "${OUTBOX_EVENTS:-0}" -gt 0 ]; then
  psql -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U postgres -d bench_orchestrator -c "
    INSERT INTO outbox (event_id, aggregate_id, sequence, event_type, payload, traceparent, created_at_ms, sent_at_ms, epoch)
    SELECT overlay(gen_random_uuid()::text placing '5' from 15 for 1),
           '00000000-0000-7000-8000-' || lpad((i / 2)::text, 12, '0'), 1 + i % 2, 'order.created', '{}', '',
           t.now_ms, t.now_ms, 1
    FROM generate_series(0, $OUTBOX_EVENTS - 1) AS i,
         (SELECT (extract(epoch FROM now()) * 1000)::bigint AS now_ms) AS t" -c "VACUUM ANALYZE outbox" >/dev/null \
    || { echo "could not fill the outbox" >&2; kill $p1 $p2 $p3 $p4; exit 1; }
  echo "outbox: $(psql -At -h 127.0.0.1 -U postgres -d bench_orchestrator -c 'SELECT COUNT(*) FROM outbox') events"
fi
psql -q -h 127.0.0.1 -U postgres -c "CHECKPOINT"
before=$(mktemp); after=$(mktemp)
statements=$(psql -At -h 127.0.0.1 -U postgres -c "SHOW shared_preload_libraries" | grep -c pg_stat_statements)
if [ "$statements" = 1 ]; then
  psql -q -h 127.0.0.1 -U postgres -c "SET client_min_messages = warning" -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" -c "SELECT pg_stat_statements_reset()" >/dev/null
fi
wal() { psql -At -h 127.0.0.1 -U postgres -c "SELECT wal_records || ' ' || wal_fpi || ' ' || wal_bytes FROM pg_stat_wal"; }
wal_before=$(wal)
cpu_by_database > "$before"
$ORDERBENCH -n "$N" -c "$C" 2>/dev/null | grep -v '^\s*$'
cpu_by_database > "$after"
wal_after=$(wal)
echo "postgres CPU per saga, by database (ms):"
join "$before" "$after" | awk -v n="$N" -v hz="$(getconf CLK_TCK)" \
  '{d=($3-$2)*1000/hz/n; if (d>0) printf "  %-20s %.3f\n", $1, d; t+=d} END {printf "  %-20s %.3f\n", "total", t}'
rm -f "$before" "$after"
echo "$wal_before $wal_after" | awk -v n="$N" \
  '{printf "postgres WAL per saga: %.1f records, %.2f full-page images, %.0f bytes\n", ($4 - $1) / n, ($5 - $2) / n, ($6 - $3) / n}'
if [ "$statements" = 1 ]; then
  echo "statements per saga, by database (calls; execution µs and pages touched in shared buffers, per saga):"
  psql -q -h 127.0.0.1 -U postgres -P pager=off -c "
    SELECT d.datname AS db, round(s.calls::numeric / $N, 2) AS per_saga,
           round((s.total_exec_time * 1000 / $N)::numeric, 1) AS exec_us_per_saga,
           round((s.shared_blks_hit + s.shared_blks_read)::numeric / $N, 1) AS pages_per_saga, round(s.plans::numeric / $N, 2) AS plans_per_saga, round((s.total_plan_time * 1000 / $N)::numeric, 1) AS plan_us_per_saga,
           left(regexp_replace(s.query, '\s+', ' ', 'g'), 90) AS statement
    FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
    WHERE d.datname LIKE 'bench_%' AND s.calls >= $N / 20
    ORDER BY d.datname, s.calls DESC"
fi
kill $p1 $p2 $p3 $p4; wait 2>/dev/null
