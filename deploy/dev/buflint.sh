#!/usr/bin/env bash
# buf lint on a staging copy of proto/ plus google/rpc/status.proto from the googleapis-common-protos wheel,
# because buf's remote dependencies need network.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
BUF=deploy/dev/buf/node_modules/.bin/buf
[ -x "$BUF" ] || (cd deploy/dev/buf && npm ci --silent)
GOOGLE=$($PY -c 'import google.rpc, os; print(os.path.dirname(os.path.dirname(google.rpc.__path__[0])))')
stage=$(mktemp -d); trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/google/rpc"
cp -r proto/clonebox "$stage/"
find "$stage/clonebox" -type f ! -name '*.proto' -delete
cp "$GOOGLE/google/rpc/status.proto" "$stage/google/rpc/"
cp proto/buf.yaml "$stage/"
"$BUF" lint "$stage" --path "$stage/clonebox"
"$BUF" build "$stage" -o /dev/null
echo "buf lint: ok"
