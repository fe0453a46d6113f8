#!/usr/bin/env bash
# Generates the Python SDK's messages and stubs from proto/ with grpcio-tools
# (pinned in requirements.txt), into ordersaga/_generated.
#
#   bash sdks/python/generate.sh           # regenerate
#   bash sdks/python/generate.sh --check   # fail if the committed code differs
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
proto=$(cd "$here/../../proto" && pwd)
out=$here/ordersaga/_generated
if [ "${1:-}" = "--check" ]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
rm -rf "$out/orders"
mkdir -p "$out"
python3 -m grpc_tools.protoc -I "$proto" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "$proto/orders/v1/orders.proto"
touch "$out/orders/__init__.py" "$out/orders/v1/__init__.py"
if [ "${1:-}" = "--check" ]; then
  if ! diff -r "$out/orders" "$here/ordersaga/_generated/orders"; then
    echo "sdks/python: the generated code does not match proto/; run bash sdks/python/generate.sh" >&2
    exit 1
  fi
  echo "sdks/python: generated code matches proto/"
fi
