#!/usr/bin/env bash
# Usage: N=10000 INFLIGHT=10000 orderbench/scripts/inflight-and-recovery.sh
# (release binaries in $R, default /work/target-release/release)
# 10,000 sagas in flight (shipping slowed by injected latency), orchestrator RSS,
# then kill -9, shipping healthy again, restart and time the recovery.
set -u
R=${R:-/work/target-release/release}
D=/tmp/mem; rm -rf $D; mkdir -p $D; cd $D
export APPLICATION_API_KEY=dev-key ADMIN_API_KEY=dev-admin-key HOST=127.0.0.1 RUST_LOG=warn
start_shipping() { REQUEST_TIMEOUT_SECS=3600 PORT=50053 METRICS_PORT=9093 DATABASE_URL=sqlite://$D/shipping.db FAULT_LATENCY_MS=${1:-0} ALLOW_UNSAFE_SETTINGS=true $R/shipping-svc > shipping.log 2>&1 & echo $! > shipping.pid; }
PORT=50052 METRICS_PORT=9092 DATABASE_URL=sqlite://$D/stock.db $R/stock-svc > stock.log 2>&1 & echo $! > stock.pid
PORT=50054 METRICS_PORT=9094 DATABASE_URL=sqlite://$D/payment.db $R/payment-svc > payment.log 2>&1 & echo $! > payment.pid
start_shipping 60000
sleep 1
STEP_TIMEOUT_MS=600000 PORT=50051 METRICS_PORT=9091 DATABASE_URL=sqlite://$D/orchestrator.db $R/orchestrator > orch.log 2>&1 & echo $! > orch.pid
sleep 1
/usr/bin/time -f "flood took %e s" $R/orderbench -n ${N:-10000} -c 64 flood 2>&1 | tail -2
sleep 2
echo "orchestrator RSS with the sagas in flight: $(ps -o rss= -p $(cat orch.pid)) KiB"
curl -s localhost:9091/metrics | grep -E "^sagas_in_flight|^saga_started_total"
kill -9 $(cat orch.pid); sleep 0.5
kill -9 $(cat shipping.pid); sleep 0.5; start_shipping 0; until (exec 3<>/dev/tcp/127.0.0.1/50053) 2>/dev/null; do sleep 0.1; done; sleep 0.5
nstat -n; T0=$(date +%s.%N)
MAX_INFLIGHT_SAGAS=${INFLIGHT:-10000} PORT=50051 METRICS_PORT=9091 DATABASE_URL=sqlite://$D/orchestrator.db $R/orchestrator > orch2.log 2>&1 & echo $! > orch.pid
sleep 0.3
(for i in 1 2 3 4 5 6; do echo "conns to 50053: $(ss -tn state established '( dport = :50053 )' | wc -l)  SYN-SENT: $(ss -tn state syn-sent | wc -l)"; ss -s | grep -i tcp: ; sleep 1; done) &
$R/orderbench drain --timeout-secs 120 2>&1 | tail -1
T1=$(date +%s.%N)
nstat | grep -E "Overflow|Drop|AttemptFail|OutRst|EstabReset|ActiveOpens|PassiveOpens"; echo "restart to all finished: $(echo "$T1 - $T0" | bc) s"
grep -i "resum" orch2.log | head -2
curl -s localhost:9091/metrics | grep -E "^saga_finished_total|^sagas_in_flight"
echo "orchestrator RSS after: $(ps -o rss= -p $(cat orch.pid)) KiB"
kill $(cat orch.pid stock.pid shipping.pid payment.pid)
