#!/usr/bin/env bash
# How fast the outbox relay publishes a backlog to RabbitMQ: the four
# binaries on the local PostgreSQL, ORDERS sagas run with no broker (their
# events wait in the outbox), EXTRA more events inserted straight into the
# outbox (a long backlog, as after the broker was away), then the
# orchestrator restarted with the broker, timed until no event is unsent.
#
#   orderbench/scripts/relay-drain.sh RELEASE_DIR MODE [ORDERS] [EXTRA]
#
# With SENT_EVENTS=N, the outbox first holds N events published an hour ago
# (200-byte payloads, kept as the relay keeps them for 7 days by default),
# older than the backlog: a relay whose next batch walks through the sent
# events pays for them at every batch.
#
# MODE is `bound` (an `orderctl events` consumer binds every routing key, so
# every event is routed to its queue) or `parked` (no queue is bound: every
# event comes back to the relay and is parked in `<exchange>.unrouted`, as
# the events of every type no consumer binds are). Each run publishes to an
# exchange of its own. RELEASE_DIR must hold orderctl too. Needs RabbitMQ on
# 127.0.0.1:5672 (guest/guest) and ports 50051-50054 free; drops and creates
# the bench_* databases on 127.0.0.1:5432.
set -u
[ $# -ge 2 ] || { echo "usage: $0 RELEASE_DIR bound|parked [ORDERS] [EXTRA]" >&2; exit 2; }
R=$1; MODE=$2; N=${3:-2000}; EXTRA=${4:-0}
case $MODE in bound|parked) ;; *) echo "$0: MODE is bound or parked, not $MODE" >&2; exit 2 ;; esac
SENT=${SENT_EVENTS:-0}
case $SENT in ''|*[!0-9]*) echo "$0: SENT_EVENTS is a count of events, not $SENT" >&2; exit 2 ;; esac
AMQP=amqp://guest:guest@127.0.0.1:5672
waitport() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.2; done; return 1; }
sql() { psql -At -h 127.0.0.1 -U postgres -d bench_orchestrator -c "$1"; }
for db in bench_orchestrator bench_stock bench_shipping bench_payment; do
  psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null 2>&1; done
PG=postgres://postgres@127.0.0.1:5432; Q="?sslmode=disable"
export APPLICATION_API_KEY=dev-key ADMIN_API_KEY=dev-admin-key HOST=127.0.0.1 RUST_LOG=warn
PORT=50052 METRICS_PORT=0 DATABASE_URL=$PG/bench_stock$Q    "$R/stock-svc"    > /dev/null 2>&1 & p1=$!
PORT=50053 METRICS_PORT=0 DATABASE_URL=$PG/bench_shipping$Q "$R/shipping-svc" > /dev/null 2>&1 & p2=$!
PORT=50054 METRICS_PORT=0 DATABASE_URL=$PG/bench_payment$Q  "$R/payment-svc"  > /dev/null 2>&1 & p3=$!
consumer=
trap 'kill $p1 $p2 $p3 ${p4:-} $consumer 2>/dev/null; wait 2>/dev/null' EXIT
waitport 50052; waitport 50053; waitport 50054
orchestrator() {
  env "$@" PORT=50051 METRICS_PORT=0 DATABASE_URL=$PG/bench_orchestrator$Q STOCK_SERVICE_URL=http://127.0.0.1:50052 \
    SHIPPING_SERVICE_URL=http://127.0.0.1:50053 PAYMENT_SERVICE_URL=http://127.0.0.1:50054 \
    "$R/orchestrator" > /dev/null 2>&1 &
}
orchestrator; p4=$!; waitport 50051
if [ "$SENT" -gt 0 ]; then
  sql "INSERT INTO outbox (event_id, aggregate_id, sequence, event_type, payload, traceparent, created_at_ms, sent_at_ms, epoch)
       SELECT gen_random_uuid()::text, gen_random_uuid()::text, 1, 'order.created', repeat('x', 200), '',
              (extract(epoch FROM now()) * 1000)::bigint - 3600000, (extract(epoch FROM now()) * 1000)::bigint - 3600000, 1
       FROM generate_series(1, $SENT)" > /dev/null || { echo "$0: could not write the sent events" >&2; exit 1; }
  sql "VACUUM ANALYZE outbox" > /dev/null || { echo "$0: VACUUM ANALYZE outbox failed" >&2; exit 1; }
fi
"$R/orderbench" -n "$N" -c 64 --echo-calls 0 > /dev/null 2>&1
kill $p4; wait $p4 2>/dev/null
if [ "$EXTRA" -gt 0 ]; then
  sql "INSERT INTO outbox (event_id, aggregate_id, sequence, event_type, payload, traceparent, created_at_ms, epoch)
       SELECT gen_random_uuid()::text, gen_random_uuid()::text, 1, 'order.created', '{\"filler\":true}', '',
              (extract(epoch FROM now()) * 1000)::bigint, 1 FROM generate_series(1, $EXTRA)" > /dev/null
fi
exchange=bench.$(date +%s%N)
if [ "$MODE" = bound ]; then
  EVENTS_EXCHANGE=$exchange "$R/orderctl" events --amqp-url "$AMQP" --binding '#' > /dev/null 2>&1 & consumer=$!
  sleep 1
fi
backlog=$(sql "SELECT count(*) FROM outbox WHERE sent_at_ms IS NULL")
t0=$(date +%s.%N)
orchestrator RABBITMQ_URL=$AMQP EVENTS_EXCHANGE=$exchange; p4=$!
while [ "$(sql "SELECT count(*) FROM outbox WHERE sent_at_ms IS NULL")" != 0 ]; do sleep 0.1; done
t1=$(date +%s.%N)
awk -v n="$backlog" -v t0="$t0" -v t1="$t1" -v mode="$MODE" \
  -v sent="$SENT" 'BEGIN {printf "%s: %d events published in %.2f s: %.0f events/s (the orchestrator'"'"'s start included; %d sent events kept)\n", mode, n, t1 - t0, n / (t1 - t0), sent}'
