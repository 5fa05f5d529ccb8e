#!/usr/bin/env bash
# The whole test suite: set-up, lint, types, then every test (root namespace tests included).
# --quick: lint, types, unit and conformance tests only (no root, no namespaces; under a minute).
# Other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=false
if [ "${1:-}" = "--quick" ]; then
  quick=true
  shift
fi
if ! $quick || [ ! -x .venv/bin/pytest ]; then
  bash scripts/setup.sh --test
fi

echo "== ruff"
.venv/bin/ruff check meshnet tests bench cni-plugin
.venv/bin/ruff format --check meshnet tests bench cni-plugin
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
if $quick; then
  exec .venv/bin/python -m pytest -p no:cacheprovider -q tests/unit \
    tests/conformance/test_istio_iptables.py tests/conformance/test_istio_nftables.py \
    tests/conformance/test_cni_install.py tests/hostile/test_boundary.py "$@"
fi
if [ "$(id -u)" != 0 ]; then
  echo "test: the network-namespace tests need root; run this as root." >&2
  exit 1
fi
.venv/bin/python -m pytest -p no:cacheprovider -q "$@"
