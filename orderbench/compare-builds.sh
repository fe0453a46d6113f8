#!/usr/bin/env bash
# Compares two release builds of the system in one session, on SQLite (under
# devstack) and on the local PostgreSQL, with one and the same orderbench
# (the second build's, or $ORDERBENCH):
#
#   orderbench/compare-builds.sh /path/to/before/release /path/to/after/release
#   STORES=postgres orderbench/compare-builds.sh ...   (one store only)
#   SSLMODE=disable orderbench/compare-builds.sh ...   (appended to every
#   DATABASE_URL; unset, sqlx's default applies: TLS when the server has it)
#   ROUNDS=5 orderbench/compare-builds.sh ...   (5 rounds, each build first in
#   every other one, then the median of each figure: this machine's speed
#   moves by a quarter from one run to the next, more than most changes)
#   N1=1500 N64=20000 orderbench/compare-builds.sh ...   (orders per run at C=1
#   and at C=64; default 500 and 3,000. 3,000 orders at C=64 last about a
#   second on SQLite: too short to tell a change of a few percent apart)
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
  echo "== $1 sqlite C=1"; $ORDERBENCH -n "${N1:-500}" -c 1 2>/dev/null | grep -v '^\s*$'
  echo "== $1 sqlite C=64"; $ORDERBENCH -n "${N64:-3000}" -c 64 2>/dev/null | grep -v '^\s*$'
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
  echo "== $1 postgres C=1"; $ORDERBENCH -n "${N1:-500}" -c 1 2>/dev/null | grep -v '^\s*$'
  echo "== $1 postgres C=64"; $ORDERBENCH -n "${N64:-3000}" -c 64 2>/dev/null | grep -v '^\s*$'
  kill $p1 $p2 $p3 $p4; wait 2>/dev/null; sleep 1
}
ROUNDS=${ROUNDS:-1}
out=$(mktemp)
for round in $(seq 1 "$ROUNDS"); do
  [ "$ROUNDS" -gt 1 ] && echo "#### round $round of $ROUNDS"
  for store in ${STORES:-sqlite postgres}; do
    case $store in
      sqlite) run=sqlite_run ;;
      postgres) run=pg_run ;;
      *) echo "STORES: unknown store $store (sqlite, postgres)" >&2; exit 2 ;;
    esac
    # The order alternates, so that a machine that speeds up or slows down
    # over the rounds favours neither build.
    if [ $((round % 2)) = 1 ]; then $run before "$1"; $run after "$2"
    else $run after "$2"; $run before "$1"; fi
  done
done | tee "$out"
if [ "$ROUNDS" -gt 1 ]; then
  # Per build, store and concurrency: the median sagas/s, p50 and CPU per
  # saga of the four processes (orderbench's own apart) over the rounds.
  echo "#### medians of $ROUNDS rounds (sagas/s, p50 ms, CPU per saga ms)"
  awk '/^== /{key=$2" "$3" "$4}
       /^throughput/{tp[key]=tp[key]" "$2}
       /^latency/{p50[key]=p50[key]" "$3}
       /^cpu\/saga/{c=0; for(i=4;i<=NF;i++) if ($i ~ /^[0-9.]+$/) c+=$i; cpu[key]=cpu[key]" "c}
       function median(list,   n, a, i, j, t) {
         n=split(list, a, " ");
         for (i=1;i<=n;i++) for (j=i+1;j<=n;j++) if (a[j]+0 < a[i]+0) {t=a[i]; a[i]=a[j]; a[j]=t}
         return n%2 ? a[(n+1)/2] : (a[n/2]+a[n/2+1])/2 }
       END {for (k in tp) printf "%-24s %8.1f sagas/s  p50 %6.2f ms  cpu %5.2f ms   (sagas/s:%s)\n", k, median(tp[k]), median(p50[k]), median(cpu[k]), tp[k]}' "$out" | sort -k2,2 -k3,3 -k1,1
fi
rm -f "$out"
