#!/usr/bin/env bash
# A three-host Ray cluster on this machine, each host a network namespace (needs root):
# a head (no role label), a host labelled baton.io/role=prefill and one labelled decode,
# joined by a bridge in a namespace of its own, Ray's token authentication on.
#
#   scripts/netns-cluster.sh up      prints the state file; then, for example:
#     S=/tmp/bmn.../state.json
#     ip netns exec "$(jq -r '.hosts[0].netns' $S)" env RAY_AUTH_MODE=token \
#         RAY_AUTH_TOKEN_PATH="$(jq -r .token_path $S)" baton serve \
#         --address "$(jq -r .address $S)" \
#         --prefill-nodes baton.io/role=prefill --decode-nodes baton.io/role=decode
#   scripts/netns-cluster.sh down STATE.json   kills every process on the hosts, removes
#                                              the namespaces, links and temp dirs
# The same harness the tests use (bench/netns.py).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
cd "$root"
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m bench.netns "$@"
