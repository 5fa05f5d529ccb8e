"""A PyInstaller onedir plugin (executable + _internal/) is installed as a whole directory."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from meshnet.cni.install.files import STANDALONE_DIR, install_binary
from tests.cni.agents import forwarder_dir


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


def test_forwarder_and_its_fallback_are_installed_together(tmp_path: Path) -> None:
    """build.sh's layout (forwarder + meshnet-cni-standalone/): copied whole, linked; run
    through the link with no agent, the forwarder finds the fallback in the installed copy."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    with forwarder_dir() as built:
        target = install_binary(built, bin_dir, "meshnet-cni")
    assert target.is_symlink() and not os.readlink(target).startswith("/")
    installed = target.resolve().parent
    assert (installed / STANDALONE_DIR / "meshnet-cni").is_file()
    conf = json.dumps({"cniVersion": "1.1.0", "cni_agent_run_dir": str(tmp_path / "run")})
    done = subprocess.run(
        [str(target)],
        input=conf,
        env={**os.environ, "CNI_COMMAND": "STATUS"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    warning = json.loads(done.stderr.splitlines()[0])
    assert warning["event"].endswith(str(installed / STANDALONE_DIR / "meshnet-cni"))
