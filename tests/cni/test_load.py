"""110 pods on one node at once (the kubelet's default max-pods), through the plugin process.

Like a runtime under load: 110 pod namespaces, 110 `meshnet-cni` ADD processes (the installed
forwarder) started together, then 110 DELs together, served by a `meshnet cni agent` or, with
none, by the standalone plugin the forwarder falls back to; and a burst during which the
agent restarts. Every call must succeed, every pod must get its complete rules, and no call
may trip over a lock. Bounded in time; the namespaces are always removed.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cni.agents import Agent, forwarder_dir
from tests.cni.fakes import (
    FakeApi,
    cni_env,
    in_netns,
    mesh_pod,
    netns_group,
    widen_backlog,
    write_kubeconfig,
)
from tests.netns.harness import require_root_netns

pytestmark = pytest.mark.netns

PODS = 110
PHASE_TIMEOUT = 240.0  # seconds for all 110 calls of one command; ~10-20 s expected
ISTIO_NAT_CHAINS = ("ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_REDIRECT")


@dataclass
class Call:
    index: int
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    started: float
    ended: float | None = None

    @property
    def stdout(self) -> str:
        return self.out.read_text()

    @property
    def stderr(self) -> str:
        return self.err.read_text()


def start_all(
    command: str, paths: list[str], conf: Path, work: Path, plugin: Path, first: int = 0
) -> list[Call]:
    """Start one plugin process per pod (pods first.. of paths), all at once; output goes to
    files (no pipes)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    calls = []
    try:
        for i, path in enumerate(paths, start=first):
            env = {**base, **cni_env(command, path, f"web-{i:03d}", container_id=f"ctr-{i:03d}")}
            out, err = work / f"{command}-{i}.out", work / f"{command}-{i}.err"
            with conf.open("rb") as stdin, out.open("wb") as o, err.open("wb") as e:
                proc = subprocess.Popen([str(plugin)], stdin=stdin, stdout=o, stderr=e, env=env)
            calls.append(Call(i, proc, out, err, time.monotonic()))
    except BaseException:
        stop(calls)
        raise
    return calls


def wait_all(calls: list[Call], timeout: float) -> list[Call]:
    """Reap every call before the deadline; returns those still running (then killed)."""
    deadline = time.monotonic() + timeout
    pending = list(calls)
    while pending and time.monotonic() < deadline:
        still = []
        for call in pending:
            if call.proc.poll() is None:
                still.append(call)
            else:
                call.ended = time.monotonic()
        pending = still
        if pending:
            time.sleep(0.02)
    stop(pending)
    return pending


def stop(calls: list[Call]) -> None:
    """Kill (by PID, via Popen) and reap any call of ours still running."""
    for call in calls:
        if call.proc.poll() is None:
            call.proc.kill()
    for call in calls:
        try:
            call.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def problems(calls: list[Call], timed_out: list[Call]) -> list[str]:
    found = [f"pod {c.index}: still running after {PHASE_TIMEOUT}s" for c in timed_out]
    for call in calls:
        if call in timed_out:
            continue
        stderr = call.stderr
        if call.proc.returncode != 0:
            found.append(f"pod {call.index}: exit {call.proc.returncode}: {call.stdout}{stderr}")
        found += [
            f"pod {call.index}: {line}" for line in stderr.splitlines() if "lock" in line.lower()
        ]
    return found


def latencies(calls: list[Call]) -> str:
    times = sorted((c.ended or 0) - c.started for c in calls)
    return f"p50 {times[len(times) // 2]:.2f}s max {times[-1]:.2f}s"


FALLBACK_LINE = "agent unreachable; running the standalone plugin"


@dataclass
class LoadNode:
    api: FakeApi
    work: Path
    paths: list[str]
    plugin: Path  # the forwarder, with its fallback beside it
    conf: Path


@pytest.fixture(scope="module")
def forwarder() -> Iterator[Path]:
    with forwarder_dir() as path:
        yield path


@pytest.fixture
def node(forwarder: Path) -> Iterator[LoadNode]:
    require_root_netns()
    suffix = secrets.token_hex(3)
    names = [f"mnt-load-{suffix}-{i:03d}" for i in range(PODS)]
    with FakeApi() as api, tempfile.TemporaryDirectory(prefix="meshnet-load-") as tmp:
        widen_backlog(api)
        for i in range(PODS):
            api.pods[("default", f"web-{i:03d}")] = mesh_pod(f"web-{i:03d}")
        work = Path(tmp)
        write_kubeconfig(work / "run", api.url)
        conf = work / "netconf.json"
        conf.write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "k8s-pod-network",
                    "type": "meshnet-cni",
                    "cni_agent_run_dir": str(work / "run"),
                    "pod_namespace": "istio-system",
                    "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "192.0.2.1/24"}]},
                }
            )
        )
        with netns_group(names) as paths:
            yield LoadNode(api, work, paths, forwarder, conf)
    left = [n for n in names if os.path.exists(f"/var/run/netns/{n}")]
    assert left == [], f"namespaces not deleted: {left}"


def run_phase(node: LoadNode, command: str) -> list[Call]:
    calls = start_all(command, node.paths, node.conf, node.work, node.plugin)
    timed_out = wait_all(calls, PHASE_TIMEOUT)
    assert not (bad := problems(calls, timed_out)), "\n".join(bad[:10])
    return calls


def assert_rules_complete(node: LoadNode, adds: list[Call]) -> None:
    for call in adds:
        assert json.loads(call.stdout)["ips"] == [{"address": "192.0.2.1/24"}]
    assert len(node.api.requests) == PODS, "every pod fetched exactly once (no retries)"
    incomplete = {}
    for i, path in enumerate(node.paths):
        save = in_netns(path, ["iptables-save"]).stdout
        missing = [c for c in ISTIO_NAT_CHAINS if f":{c} - " not in save]
        if missing or "-A OUTPUT -j ISTIO_OUTPUT" not in save:
            incomplete[i] = missing or ["the OUTPUT jump"]
    assert not incomplete, f"pods with incomplete rules: {incomplete}"


def assert_rules_gone(node: LoadNode) -> None:
    left = [i for i, p in enumerate(node.paths) if "ISTIO" in in_netns(p, ["iptables-save"]).stdout]
    assert not left, f"pods with ISTIO rules after DEL: {left}"


def fell_back(calls: list[Call]) -> int:
    return sum(1 for call in calls if FALLBACK_LINE in call.stderr)


@pytest.mark.parametrize("served", [True, False], ids=["agent", "fallback"])
def test_110_pods_added_and_deleted_concurrently(
    node: LoadNode, served: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = Agent(node.work / "run")
    try:
        if served:
            agent.start()
        adds = run_phase(node, "ADD")
        assert_rules_complete(node, adds)
        dels = run_phase(node, "DEL")
        assert_rules_gone(node)
        assert fell_back(adds + dels) == (0 if served else 2 * PODS)
    finally:
        agent.close()
    with capsys.disabled():
        label = "agent" if served else "fallback"
        print(f"\n110 concurrent ADD ({label}): {latencies(adds)}; DEL: {latencies(dels)}")


def test_agent_restart_in_the_middle_of_a_110_pod_burst(node: LoadNode) -> None:
    """A third of the pods start before the agent gets SIGTERM, a third while it is gone (the
    forwarder falls back), a third once its successor serves: no call may fail."""
    run_dir = node.work / "run"
    node.api.delay = 0.2  # the first agent still has calls in flight when it is stopped
    first, second = Agent(run_dir), Agent(run_dir)
    thirds = [node.paths[:37], node.paths[37:74], node.paths[74:]]
    try:
        first.start()
        adds = start_all("ADD", thirds[0], node.conf, node.work, node.plugin)
        assert first.proc is not None
        first.proc.send_signal(signal.SIGTERM)
        while first.socket.exists() and first.proc.poll() is None:
            time.sleep(0.005)  # the socket is unlinked first: from here on calls fall back
        adds += start_all("ADD", thirds[1], node.conf, node.work, node.plugin, first=37)
        second.start()
        adds += start_all("ADD", thirds[2], node.conf, node.work, node.plugin, first=74)
        timed_out = wait_all(adds, PHASE_TIMEOUT)
        assert not (bad := problems(adds, timed_out)), "\n".join(bad[:10])
        assert first.stop() == 0
        assert_rules_complete(node, adds)
        by_first = sum(1 for r in first.records() if r.get("event") == "cni request done")
        by_second = sum(1 for r in second.records() if r.get("event") == "cni request done")
        assert by_first >= 1 and by_second >= 1 and fell_back(adds) >= 1
        assert by_first + by_second + fell_back(adds) == PODS
        node.api.delay = 0
        run_phase(node, "DEL")
        assert_rules_gone(node)
    finally:
        first.close()
        second.close()
