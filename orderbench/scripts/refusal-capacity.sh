#!/usr/bin/env bash
# How many refusals per second the orchestrator can give, against how many
# trivial calls: devstack with MAX_WAITING_SAGAS=0 (every CreateOrder is
# refused RESOURCE_EXHAUSTED, the path an overloaded orchestrator takes for
# all but the orders it admits), then h2load (Debian's nghttp2-client) on
# CreateOrder and on grpc.health.v1 Check, in turns. h2load is a C client
# that costs far less per call than orderbench, so what it measures is the
# server's side.
#
#   orderbench/scripts/refusal-capacity.sh RELEASE_DIR [CALLS] [ROUNDS]
#
# Needs ports 50051-50054 free.
set -u
[ $# -ge 1 ] || { echo "usage: $0 RELEASE_DIR [CALLS] [ROUNDS]" >&2; exit 2; }
R=$1; N=${2:-100000}; ROUNDS=${3:-2}
command -v h2load >/dev/null || { echo "$0: h2load not found (apt-get install nghttp2-client)" >&2; exit 2; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
# One gRPC frame (flag 0, length 101) of a valid CreateOrderRequest:
# request_id 0a3f1c52-6d1e-4a8e-9f3a-2b7d4c1e9f00, customer alice, 1 × BOOK,
# to Ada Lovelace, 1 Main St, 10115 Berlin, DE.
printf '\x00\x00\x00\x00\x65\x0a\x24\x30\x61\x33\x66\x31\x63\x35\x32\x2d\x36\x64\x31\x65\x2d\x34\x61\x38\x65\x2d\x39\x66\x33\x61\x2d\x32\x62\x37\x64\x34\x63\x31\x65\x39\x66\x30\x30\x12\x05\x61\x6c\x69\x63\x65\x1a\x08\x0a\x04\x42\x4f\x4f\x4b\x10\x01\x22\x2c\x0a\x0c\x41\x64\x61\x20\x4c\x6f\x76\x65\x6c\x61\x63\x65\x12\x09\x31\x20\x4d\x61\x69\x6e\x20\x53\x74\x1a\x06\x42\x65\x72\x6c\x69\x6e\x22\x05\x31\x30\x31\x31\x35\x2a\x02\x44\x45' > "$dir/create.bin"
printf '\x00\x00\x00\x00\x00' > "$dir/check.bin"

APPLICATION_API_KEY=dev-key ADMIN_API_KEY=dev-admin-key MAX_WAITING_SAGAS=0 RUST_LOG=warn \
  "$R/devstack" --data-dir "$dir/data" > "$dir/devstack.log" 2>&1 &
stack=$!
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/50051) 2>/dev/null && break; sleep 0.2; done
sleep 1
status=$(curl -s -D - -o /dev/null --http2-prior-knowledge -H content-type:application/grpc -H te:trailers \
  -H x-api-key:dev-key --data-binary @"$dir/create.bin" http://127.0.0.1:50051/orders.v1.OrderService/CreateOrder \
  | tr -d '\r' | awk -F': ' '$1 == "grpc-status" {print $2}')
[ "$status" = 8 ] || { echo "$0: CreateOrder answered grpc-status '$status', not 8 (RESOURCE_EXHAUSTED)" >&2; kill $stack; exit 1; }

calls_per_s() {
  h2load -n "$N" -c 8 -m 8 -H content-type:application/grpc -H te:trailers -H x-api-key:dev-key \
    -d "$1" "http://127.0.0.1:50051/$2" 2>&1 | awk '/^finished in/ {print $4}'
}
for round in $(seq 1 "$ROUNDS"); do
  refusals=$(calls_per_s "$dir/create.bin" orders.v1.OrderService/CreateOrder)
  checks=$(calls_per_s "$dir/check.bin" grpc.health.v1.Health/Check)
  echo "round $round: CreateOrder refused ${refusals} calls/s; health Check ${checks} calls/s"
done
kill $stack; wait $stack 2>/dev/null
