#!/usr/bin/env bash
# Builds the node's meshnet-cni plugin files into OUT (default dist), a ready CNI bin dir:
#   OUT/meshnet-cni                          the forwarder (forwarder.c, static: no runtime
#                                            dependencies), which sends each call to
#                                            `meshnet cni agent`
#   OUT/meshnet-cni-standalone/meshnet-cni   the standalone plugin (PyInstaller --onedir, with
#                                            its _internal/): the forwarder execs it when the
#                                            agent is unreachable; it runs without Python
# Usage: bash cni-plugin/build.sh [--forwarder-only] [OUT]   (needs gcc and libc6-dev; the
#        standalone plugin also the project venv: scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
forwarder_only=false
if [[ ${1:-} == --forwarder-only ]]; then
  forwarder_only=true
  shift
fi
out=${1:-dist}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# -Os -s: ~0.8 MB, starts in ~1 ms; static glibc is fine here (no NSS or dlopen calls).
gcc -static -Os -s -Wall -Wextra -Werror -o "$work/meshnet-cni" cni-plugin/forwarder.c
if [[ $forwarder_only == false ]]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check "pyinstaller>=6,<7"
  # onedir starts in ~0.25 s, onefile in ~0.4-0.5 s (it unpacks itself on every run): onedir.
  # pyroute2 is left out on purpose: the plugin imports it only for TPROXY routes and ::6, so
  # it is collected as a hidden import to keep those paths working.
  .venv/bin/python -m PyInstaller --noconfirm --clean --onedir --name meshnet-cni \
    --distpath "$work/dist" --workpath "$work/build" --specpath "$work" \
    --hidden-import pyroute2 --collect-submodules pyroute2 \
    --exclude-module tkinter --exclude-module unittest --exclude-module pydoc \
    cni-plugin/meshnet_cni.py >"$work/log" 2>&1 || { cat "$work/log" >&2; exit 1; }
  rm -rf "$out/meshnet-cni-standalone"
  mv "$work/dist/meshnet-cni" "$out/meshnet-cni-standalone"
fi
mv -f "$work/meshnet-cni" "$out/meshnet-cni"
echo "built $out/meshnet-cni$([[ $forwarder_only == true ]] || echo " and $out/meshnet-cni-standalone/")"
