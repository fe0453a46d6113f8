#!/bin/sh
# Seeds the demo catalogue and accounts (the same as `cargo run -p devstack`)
# through the services' own gRPC APIs, with grpcurl. The compose `seed` service
# runs it once the stock and payment services are healthy.
#
# Every call has a fixed request_id, so running it again changes nothing: the
# services answer a repeated request_id with the stored reply.
#
# Env: ADMIN_API_KEY (required: Restock and Deposit are admin RPCs), STOCK_ADDR (default stock-svc:50052),
# PAYMENT_ADDR (default payment-svc:50054).
set -eu

: "${ADMIN_API_KEY:?ADMIN_API_KEY must be set}"
STOCK_ADDR="${STOCK_ADDR:-stock-svc:50052}"
PAYMENT_ADDR="${PAYMENT_ADDR:-payment-svc:50054}"

call() {
  # call ADDR METHOD JSON
  grpcurl -plaintext -max-time 10 -H "x-api-key: ${ADMIN_API_KEY}" -d "$3" "$1" "$2" >/dev/null
}

restock() {
  # restock SKU NAME UNIT_PRICE_CENTS QUANTITY
  call "$STOCK_ADDR" stock.v1.StockService/Restock \
    "{\"request_id\": \"demo-seed-$1\", \"sku\": \"$1\", \"name\": \"$2\", \"unit_price_cents\": $3, \"quantity\": $4, \"currency\": \"EUR\"}"
  echo "seed: product $1"
}

deposit() {
  # deposit CUSTOMER AMOUNT_CENTS
  call "$PAYMENT_ADDR" payment.v1.PaymentService/Deposit \
    "{\"request_id\": \"demo-seed-$1\", \"customer_id\": \"$1\", \"amount_cents\": $2, \"currency\": \"EUR\"}"
  echo "seed: account $1"
}

restock BOOK-1 "The Rust Programming Language" 3999 100
restock MUG-1 "Saga mug" 1250 200
restock TSHIRT-1 "Compensation T-shirt" 2400 50
restock RARE-1 "Signed first edition" 50000 1

deposit alice 100000
deposit bob 50000
# "poor" can't pay for anything: its orders are compensated.
deposit poor 500

echo "seed: done"
