#!/usr/bin/env bash
# Generates the TypeScript SDK's messages and service descriptor from proto/
# with buf (tools/) and protoc-gen-es (pinned in package.json), into src/gen.
#
#   bash sdks/typescript/generate.sh           # regenerate
#   bash sdks/typescript/generate.sh --check   # fail if the committed code differs
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
buf=$here/../../tools/node_modules/.bin/buf
cd "$here"
if [ "${1:-}" = "--check" ]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
  "$buf" generate --template buf.gen.yaml -o "$out"
  if ! diff -r "$out/src/gen" src/gen; then
    echo "sdks/typescript: the generated code does not match proto/; run bash sdks/typescript/generate.sh" >&2
    exit 1
  fi
  echo "sdks/typescript: generated code matches proto/"
else
  "$buf" generate --template buf.gen.yaml
fi
