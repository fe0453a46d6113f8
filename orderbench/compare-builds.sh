#!/usr/bin/env bash
# Compares two release builds of the system in one session, on SQLite (under
# devstack) and on the local PostgreSQL, with one and the same orderbench
# (the second build's, or $ORDERBENCH):
#
#   orderbench/compare-builds.sh /path/to/before/release /path/to/after/release
#   STORES=postgres orderbench/compare-builds.sh ...   (one store only)
#   SSLMODE=disable orderbench/compare-builds.sh ...   (appended to every
#   DATABASE_URL; unset, sqlx's default applies: TLS when the server has it)
#
# Each build dir must hold devstack, orchestrator, stock-svc, shipping-svc and
# payment-svc (cargo build --release -p devstack -p orderbench -p orchestrator
# -p stock-svc -p shipping-svc -p payment-svc). Needs ports 50051-50054 free
# and drops/creates the bench_* databases on 127.0.0.1:5432.
set -u
[ $# -eq 2 ] || { echo "usage: $0 BEFORE_RELEASE_DIR AFTER_RELEASE_DIR" >&2; exit 2; }
ORDERBENCH=${ORDERBENCH:-$2/orderbench}
waitport() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.2; done; return 1; }
sqlite_run() { # $1 label, $2 release dir
  local dir; dir=$(mktemp -d)
  RUST_LOG=warn DATA_DIR=$dir $2/devstack > /dev/null 2>&1 &
  local pid=$!
  waitport 50051; sleep 2
  echo "== $1 sqlite C=1"; $ORDERBENCH -n 500 -c 1 2>/dev/null | grep -v '^\s*$'
  echo "== $1 sqlite C=64"; $ORDERBENCH -n 3000 -c 64 2>/dev/null | grep -v '^\s*$'
  kill $pid; wait $pid 2>/dev/null; sleep 1; rm -rf $dir
}
pg_run() { # $1 label, $2 release dir
  for db in bench_orchestrator bench_stock bench_shipping bench_payment; do
    psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null; done
  local PG=postgres://postgres@127.0.0.1:5432 Q=${SSLMODE:+?sslmode=$SSLMODE}
  export APPLICATION_API_KEY=dev-key ADMIN_API_KEY=dev-admin-key HOST=127.0.0.1 RUST_LOG=warn
  PORT=50052 METRICS_PORT=0 DATABASE_URL=$PG/bench_stock$Q    $2/stock-svc > /dev/null 2>&1 & p1=$!
  PORT=50053 METRICS_PORT=0 DATABASE_URL=$PG/bench_shipping$Q $2/shipping-svc > /dev/null 2>&1 & p2=$!
  PORT=50054 METRICS_PORT=0 DATABASE_URL=$PG/bench_payment$Q  $2/payment-svc > /dev/null 2>&1 & p3=$!
  waitport 50052; waitport 50053; waitport 50054
  PORT=50051 METRICS_PORT=0 DATABASE_URL=$PG/bench_orchestrator$Q STOCK_SERVICE_URL=http://127.0.0.1:50052 SHIPPING_SERVICE_URL=http://127.0.0.1:50053 PAYMENT_SERVICE_URL=http://127.0.0.1:50054 $2/orchestrator > /dev/null 2>&1 & p4=$!
  waitport 50051; sleep 1
  echo "== $1 postgres C=1"; $ORDERBENCH -n 500 -c 1 2>/dev/null | grep -v '^\s*$'
  echo "== $1 postgres C=64"; $ORDERBENCH -n 3000 -c 64 2>/dev/null | grep -v '^\s*$'
  kill $p1 $p2 $p3 $p4; wait 2>/dev/null; sleep 1
}
for store in ${STORES:-sqlite postgres}; do
  case $store in
    sqlite) sqlite_run before "$1"; sqlite_run after "$2" ;;
    postgres) pg_run before "$1"; pg_run after "$2" ;;
    *) echo "STORES: unknown store $store (sqlite, postgres)" >&2; exit 2 ;;
  esac
done
