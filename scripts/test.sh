#!/usr/bin/env bash
# The whole test suite: set-up, lint, types, then every test (root namespace tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test

echo "== ruff"
.venv/bin/ruff check meshnet tests bench cni-plugin
.venv/bin/ruff format --check meshnet tests bench cni-plugin
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
if [ "$(id -u)" != 0 ]; then
  echo "test: the network-namespace tests need root; run this as root." >&2
  exit 1
fi
.venv/bin/python -m pytest -p no:cacheprovider -q "$@"
