#!/usr/bin/env bash
# Builds the standalone meshnet-cni plugin (PyInstaller --onedir): it runs on a node without
# Python. Output: dist/meshnet-cni/meshnet-cni (+ its _internal/ directory).
# Usage: bash cni-plugin/build.sh [OUTDIR]     (needs the project venv: scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dist}
.venv/bin/python -m pip install -q --disable-pip-version-check "pyinstaller>=6,<7"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# onedir starts in ~0.25 s, onefile in ~0.4-0.5 s (it unpacks itself on every run): onedir.
# pyroute2 is left out on purpose: the plugin imports it only for TPROXY routes and ::6, so it
# is collected as a hidden import to keep those paths working.
.venv/bin/python -m PyInstaller --noconfirm --clean --onedir --name meshnet-cni \
  --distpath "$out" --workpath "$work/build" --specpath "$work" \
  --hidden-import pyroute2 --collect-submodules pyroute2 \
  --exclude-module tkinter --exclude-module unittest --exclude-module pydoc \
  cni-plugin/meshnet_cni.py >"$work/log" 2>&1 || { cat "$work/log" >&2; exit 1; }
echo "built $out/meshnet-cni/meshnet-cni"
