"""The init container's commands import only what they use: never asyncio, ssl, pyroute2,
click, ctypes or shutil.

Each of those costs the init container more than its whole rule work (asyncio and ssl come
with structlog; pyroute2 takes ~300 ms; click ~30 ms). The real entry point runs in a wrapper
that, at exit, reports which of them were imported; the apply runs in a throw-away pod
namespace.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.cli import STANDARD_ARGS, clean_env

from .harness import Topology

HEAVY = ("asyncio", "ssl", "pyroute2", "structlog", "click", "ctypes", "shutil")
# Runs meshnet's real entry point; at exit (after sys.exit too) prints the heavy modules seen.
WRAPPER = (
    "import atexit, sys\n"
    f"heavy = {HEAVY!r}\n"
    "atexit.register(lambda: print('IMPORTED', sorted({m.split('.')[0] for m in sys.modules}"
    " & set(heavy)), file=sys.stderr))\n"
    "from meshnet.entry import main\n"
    "main(sys.argv[1:])\n"
)


def imported(prefix: list[str], *args: str) -> tuple[subprocess.CompletedProcess[str], str]:
    argv = [*prefix, sys.executable, "-c", WRAPPER, *args]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env=clean_env(), check=False
    )
    lines = [line for line in done.stderr.splitlines() if line.startswith("IMPORTED ")]
    assert lines, done.stderr
    return done, lines[-1].removeprefix("IMPORTED ")


def test_dry_run_imports_none_of_the_heavy_modules() -> None:
    done, heavy = imported([], "istio-iptables", *STANDARD_ARGS, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "-A ISTIO_OUTPUT" in done.stdout
    assert heavy == "[]"


def test_help_still_comes_from_click() -> None:
    done, heavy = imported([], "istio-iptables", "--help")
    assert done.returncode == 0, done.stderr
    assert "--envoy-port" in done.stdout
    assert "'click'" in heavy


@pytest.mark.parametrize("command", ["istio-iptables", "verify", "clean"])
def test_apply_verify_clean_import_none_of_the_heavy_modules(
    topology: Topology, command: str
) -> None:
    in_pod = ["ip", "netns", "exec", topology.pod_ns]
    if command != "istio-iptables":
        applied, _ = imported(in_pod, "istio-iptables", *STANDARD_ARGS)
        assert applied.returncode == 0, applied.stderr
    done, heavy = imported(in_pod, command, *STANDARD_ARGS)
    assert done.returncode == 0, done.stderr
    saved = topology.exec(topology.pod_ns, ["iptables-save"]).stdout
    assert (":ISTIO_OUTPUT" in saved) == (command != "clean")
    # verify canonicalizes the plan in a throw-away namespace: unshare(2) is called by ctypes.
    assert heavy == ("['ctypes']" if command == "verify" else "[]")
