#!/usr/bin/env bash
# Installs what meshnet needs on Debian 12 (run as root), then the venv in .venv.
# With --test, also what the test suite needs (reference CNI plugins, a Go toolchain for the
# libcni driver, podman for the images, graphviz for the dot output, test-only Python deps).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(iptables nftables iproute2 ipset python3-venv)
extra=""
if [ "${1:-}" = "--test" ]; then
  packages+=(procps containernetworking-plugins golang-go golang-github-appc-cni-dev
             podman runc debootstrap graphviz)
  extra="[test]"
fi
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's interpreter, not a pyenv shim that may shadow it on PATH.
python=/usr/bin/python3
[ -x "$python" ] || python=$(command -v python3)
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}"
