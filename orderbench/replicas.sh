#!/usr/bin/env bash
# orderbench against 1, 2 and 3 orchestrator replicas on one PostgreSQL, in
# one run, with the orders spread over the replicas (client-side balancing):
#
#   orderbench/replicas.sh AFTER_RELEASE_DIR [BEFORE_RELEASE_DIR]
#
# With BEFORE_RELEASE_DIR (a build from before replicas existed), its single
# orchestrator runs first and last, around the replica runs, for the cost of
# the lease machinery on one replica and the drift of the machine meanwhile.
# On 2 cores more replicas are no speed-up: they show the cost of leases and
# fencing. Each release dir must hold orchestrator, stock-svc, shipping-svc
# and payment-svc; orderbench is AFTER's (or $ORDERBENCH). Needs ports
# 50051-50054, 50061 and 50071 free; drops/creates the bench_* databases on
# 127.0.0.1:5432.
set -u
[ $# -ge 1 ] || { echo "usage: $0 AFTER_RELEASE_DIR [BEFORE_RELEASE_DIR]" >&2; exit 2; }
AFTER=$1
BEFORE=${2:-}
ORDERBENCH=${ORDERBENCH:-$AFTER/orderbench}
N1=${N1:-500}
N64=${N64:-3000}
PG=postgres://postgres@127.0.0.1:5432
export APPLICATION_API_KEY=dev-key ADMIN_API_KEY=dev-admin-key HOST=127.0.0.1 RUST_LOG=warn
waitport() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.2; done; return 1; }
fresh_db() { psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $1 WITH (FORCE)" -c "CREATE DATABASE $1" >/dev/null; }

for db in bench_stock bench_shipping bench_payment; do fresh_db $db; done
PORT=50052 METRICS_PORT=0 DATABASE_URL=$PG/bench_stock    $AFTER/stock-svc > /dev/null 2>&1 & s1=$!
PORT=50053 METRICS_PORT=0 DATABASE_URL=$PG/bench_shipping $AFTER/shipping-svc > /dev/null 2>&1 & s2=$!
PORT=50054 METRICS_PORT=0 DATABASE_URL=$PG/bench_payment  $AFTER/payment-svc > /dev/null 2>&1 & s3=$!
trap 'kill $s1 $s2 $s3 2>/dev/null' EXIT
waitport 50052; waitport 50053; waitport 50054

run_case() { # $1 label, $2 release dir, $3 replicas
  fresh_db bench_orchestrator
  local pids=() addrs=()
  for i in $(seq 0 $(($3 - 1))); do
    local port=$((50051 + 10 * i))
    REPLICA_ID=r$i PORT=$port METRICS_PORT=0 DATABASE_URL=$PG/bench_orchestrator \
      STOCK_SERVICE_URL=http://127.0.0.1:50052 SHIPPING_SERVICE_URL=http://127.0.0.1:50053 \
      PAYMENT_SERVICE_URL=http://127.0.0.1:50054 $2/orchestrator > /dev/null 2>&1 &
    pids+=($!)
    waitport $port
    addrs+=(http://127.0.0.1:$port)
  done
  sleep 1
  local list; list=$(IFS=,; echo "${addrs[*]}")
  echo "== $1 C=1"; $ORDERBENCH --addr "$list" -n $N1 -c 1 2>/dev/null | grep -v '^\s*$'
  echo "== $1 C=64"; $ORDERBENCH --addr "$list" -n $N64 -c 64 2>/dev/null | grep -v '^\s*$'
  kill "${pids[@]}"; wait "${pids[@]}" 2>/dev/null; sleep 1
}

[ -n "$BEFORE" ] && run_case "before (one orchestrator, no leases)" "$BEFORE" 1
run_case "1 replica" "$AFTER" 1
run_case "2 replicas" "$AFTER" 2
run_case "3 replicas" "$AFTER" 3
[ -n "$BEFORE" ] && run_case "before again (drift check)" "$BEFORE" 1
exit 0
