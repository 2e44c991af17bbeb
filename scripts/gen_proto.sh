#!/usr/bin/env bash
# Regenerates the Python message classes from proto/. The gencode is pinned to protobuf 5.27 so it
# loads on any protobuf runtime >= 5.27 (the GPU image and fresh installs alike). Service handlers
# are written by hand in saw_worker/server.py, so no grpcio version is baked in.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d)
python -m pip install -q --target "$tools" grpcio-tools==1.66.2 protobuf==5.28.3
for f in saw health; do
  PYTHONPATH="$tools" python -m grpc_tools.protoc -Iproto --python_out=python/saw_worker/proto \
    --pyi_out=python/saw_worker/proto "proto/$f.proto"
done
rm -rf "$tools"
