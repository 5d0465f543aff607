#!/usr/bin/env bash
# Regenerate the Python API modules and mypy stubs beside the .proto files in proto/.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
# the protoc plugins (protoc-gen-mypy, protoc-gen-mypy_grpc) live beside the interpreter
export PATH="$(cd "$(dirname "$PY")" && pwd):$PATH"
# googleapis-common-protos ships google/rpc/*.proto; point protoc at it instead of vendoring
GOOGLE=$($PY -c 'import google.rpc, os; print(os.path.dirname(os.path.dirname(google.rpc.__path__[0])))')
find proto/clonebox -name '*_pb2*.py' -delete -o -name '*_pb2*.pyi' -delete
$PY -m grpc_tools.protoc -Iproto -I"$GOOGLE" \
  --python_out=proto --mypy_out=proto \
  --grpc_python_out=proto --mypy_grpc_out=proto \
  $(find proto/clonebox -name '*.proto' | sort) 2> >(grep -v '^Writing mypy to' >&2)
# namespace packages need no __init__.py, but a py.typed marker lets mypy use the stubs
for d in $(find proto/clonebox -type d); do : > "$d/__init__.py"; done
: > proto/clonebox/py.typed
