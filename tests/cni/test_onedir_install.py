"""A PyInstaller onedir plugin (executable + _internal/) is installed as a whole directory."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from meshnet.cni.install import install_binary


def _onedir(root: Path, version: str) -> Path:
    (root / "_internal").mkdir(parents=True)
    (root / "_internal" / "version").write_text(version)
    exe = root / "meshnet-cni"
    # Like PyInstaller's bootloader: find _internal next to the real executable.
    exe.write_text('#!/bin/sh\ncat "$(dirname "$(readlink -f "$0")")/_internal/version"\n')
    exe.chmod(0o755)
    return exe


def test_onedir_build_is_copied_whole_and_linked(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "bridge").write_text("other plugin")
    first = install_binary(_onedir(tmp_path / "v1", "one"), bin_dir, "meshnet-cni")
    assert first == bin_dir / "meshnet-cni" and first.is_symlink()
    assert not os.readlink(first).startswith("/")  # relative: valid inside and outside the pod
    assert subprocess.run([str(first)], capture_output=True, text=True).stdout == "one"
    again = install_binary(_onedir(tmp_path / "v1b", "one"), bin_dir, "meshnet-cni")
    assert os.readlink(again) == os.readlink(first)  # same build: nothing rewritten
    second = install_binary(_onedir(tmp_path / "v2", "two"), bin_dir, "meshnet-cni")
    assert subprocess.run([str(second)], capture_output=True, text=True).stdout == "two"
    versions = list((bin_dir / "meshnet-cni.d").iterdir())
    assert len(versions) == 1  # the old copy is gone once nothing points at it
    assert (bin_dir / "bridge").read_text() == "other plugin"
    assert not list(bin_dir.glob("meshnet-cni.tmp.*"))
