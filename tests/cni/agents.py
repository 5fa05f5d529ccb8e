"""The node's plugin as installed: the C forwarder, its standalone fallback, the resident agent.

`plugin_dir` lays out what `cni-plugin/build.sh` leaves in a CNI bin dir, except that the
fallback is a script running this checkout's plugin with the venv's Python (the PyInstaller
build of it is tested in test_standalone.py). `Agent` runs `meshnet cni agent` as a process,
optionally inside a network namespace, and stops it with SIGTERM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from meshnet.cni.plugin.main import KUBECONFIG_NAME
from tests.support import REPO

SOCKET_NAME = "meshnet-cni.sock"
FALLBACK = "meshnet-cni-standalone/meshnet-cni"


def build_forwarder(out: Path) -> Path:
    """`build.sh --forwarder-only OUT`: the static forwarder, as the image builds it."""
    subprocess.run(
        ["bash", str(REPO / "cni-plugin" / "build.sh"), "--forwarder-only", str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out / "meshnet-cni"


def plugin_dir(bin_dir: Path, forwarder: Path) -> Path:
    """`meshnet-cni` (the forwarder) and its fallback beside it; returns the forwarder."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    target = bin_dir / "meshnet-cni"
    shutil.copy2(forwarder, target)
    fallback = bin_dir / FALLBACK
    fallback.parent.mkdir(exist_ok=True)
    python = Path(sys.executable).absolute()  # the venv's python, not its resolved target
    fallback.write_text(f'#!/bin/sh\nexec "{python}" -m meshnet.cni "$@"\n')
    fallback.chmod(fallback.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return target


class Agent:
    """`meshnet cni agent` serving `run_dir` (inside network namespace `netns` if given)."""

    def __init__(self, run_dir: Path, netns: str | None = None, **env: str) -> None:
        self.run_dir = run_dir
        self.netns = netns
        self.env = env
        self.log = Path(tempfile.mkstemp(prefix="meshnet-agent-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.run_dir / SOCKET_NAME

    def start(self, timeout: float = 30) -> Agent:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
        env |= {"CNI_AGENT_RUN_DIR": str(self.run_dir), **self.env}
        argv = [sys.executable, "-m", "meshnet", "cni", "agent"]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]  # ip execs: the same pid
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while not self.serving():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"agent did not start: {self.log.read_text()}")
            time.sleep(0.02)
        return self

    def serving(self) -> bool:
        return '"event": "serving"' in self.log.read_text() and self.socket.exists()

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (by our pid), wait; returns the exit code (kills it if it hangs)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        self.proc = None
        return code

    def records(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def close(self) -> None:
        self.stop()
        self.log.unlink(missing_ok=True)

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_forwarder(
    forwarder: Path, env: Mapping[str, str], stdin: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the forwarder as the runtime does: a process, CNI_* env, config on stdin."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    full.update(env)
    return subprocess.run(
        [str(forwarder)],
        input=stdin,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def through_agent(
    forwarder: Path, agent_dir: Path, env: dict[str, str], stdin: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """The test's netconf, pointed at the shared agent's run dir, which gets the kubeconfig of
    the test's run dir (or none, as there)."""
    try:
        conf = json.loads(stdin)
    except ValueError:
        conf = None  # no run dir to find: the forwarder falls back, as it must
    if isinstance(conf, dict):
        given = agent_dir / KUBECONFIG_NAME
        source = Path(str(conf.get("cni_agent_run_dir"))) / KUBECONFIG_NAME
        if source.exists():
            # Atomically: concurrent calls of one test copy while the agent reads the file.
            partial = given.with_name(f".{given.name}.{threading.get_ident()}")
            shutil.copyfile(source, partial)
            os.replace(partial, given)
        else:
            given.unlink(missing_ok=True)
        stdin = json.dumps({**conf, "cni_agent_run_dir": str(agent_dir)})
    result = run_forwarder(forwarder, env, stdin, timeout)
    if conf is not None:
        assert "agent unreachable" not in result.stderr, result.stderr
    return result


def through_fallback(
    forwarder: Path, env: dict[str, str], stdin: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    result = run_forwarder(forwarder, env, stdin, timeout)
    if env.get("CNI_COMMAND") not in (None, "", "VERSION"):
        assert "agent unreachable; running the standalone plugin" in result.stderr
    return result


@contextmanager
def forwarder_dir() -> Iterator[Path]:
    """A plugin dir (forwarder + fallback) in a fresh temporary directory."""
    with tempfile.TemporaryDirectory(prefix="meshnet-fwd-") as tmp:
        built = build_forwarder(Path(tmp) / "build")
        yield plugin_dir(Path(tmp) / "bin", built)
