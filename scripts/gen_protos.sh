#!/usr/bin/env bash
# Regenerates the committed grpc stubs.
#
#   gen_protos.sh                 both sets in place: kv_transfer/proto and baton/v1
#   gen_protos.sh DIR             the kv_transfer stubs into DIR
#   gen_protos.sh DIR baton       the baton.v1 stubs into DIR
#
# The stub freshness tests regenerate into a temporary DIR and compare with the commit.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"

gen_kv_transfer() {
    local out="$1"
    mkdir -p "$out"
    "$python" -m grpc_tools.protoc -I "$root/kv_transfer/proto" \
        --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
        "$root"/kv_transfer/proto/*.proto
    # grpc_tools writes a top-level import; the stubs live in a package.
    sed -i 's/^import kv_transfer_pb2 as kv__transfer__pb2$/from . import kv_transfer_pb2 as kv__transfer__pb2/' \
        "$out/kv_transfer_pb2_grpc.py"
}

gen_baton() {
    local out="$1" tmp
    mkdir -p "$out"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' RETURN
    # Compiled from the repository root so that the descriptor's file name is
    # "baton/v1/baton.proto" (what reflection clients see), then moved up.
    (cd "$root" && "$python" -m grpc_tools.protoc -I . \
        --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" baton/v1/baton.proto)
    sed -i 's/^from baton\.v1 import baton_pb2 as \(.*\)$/from . import baton_pb2 as \1/' \
        "$tmp/baton/v1/baton_pb2_grpc.py"
    cp "$tmp"/baton/v1/baton_pb2.py "$tmp"/baton/v1/baton_pb2.pyi \
        "$tmp"/baton/v1/baton_pb2_grpc.py "$out"/
}

if [[ $# -eq 0 ]]; then
    gen_kv_transfer "$root/kv_transfer/proto"
    gen_baton "$root/baton/v1"
elif [[ "${2:-kv_transfer}" == kv_transfer ]]; then
    gen_kv_transfer "$1"
elif [[ "$2" == baton ]]; then
    gen_baton "$1"
else
    echo "usage: $0 [DIR [kv_transfer|baton]]" >&2
    exit 2
fi
