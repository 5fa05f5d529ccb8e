"""110 pods on one node at once (the kubelet's default max-pods), through the plugin process.

Like a runtime under load: 110 pod namespaces, 110 `meshnet-cni` ADD processes started
together, then 110 DELs together. Every call must succeed, every pod must get its complete
rules, and no call may trip over a lock (SPEC.md §7). Bounded in time; the namespaces are
always removed.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

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


def start_all(command: str, paths: list[str], conf: Path, work: Path) -> list[Call]:
    """Start one plugin process per pod, all at once; output goes to files (no pipes)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    calls = []
    try:
        for i, path in enumerate(paths):
            env = {**base, **cni_env(command, path, f"web-{i:03d}", container_id=f"ctr-{i:03d}")}
            out, err = work / f"{command}-{i}.out", work / f"{command}-{i}.err"
            with conf.open("rb") as stdin, out.open("wb") as o, err.open("wb") as e:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "meshnet.cni"], stdin=stdin, stdout=o, stderr=e, env=env
                )
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


@pytest.fixture
def node() -> Iterator[tuple[FakeApi, Path, list[str]]]:
    require_root_netns()
    suffix = secrets.token_hex(3)
    names = [f"mnt-load-{suffix}-{i:03d}" for i in range(PODS)]
    with FakeApi() as api, tempfile.TemporaryDirectory(prefix="meshnet-load-") as tmp:
        widen_backlog(api)
        for i in range(PODS):
            api.pods[("default", f"web-{i:03d}")] = mesh_pod(f"web-{i:03d}")
        work = Path(tmp)
        write_kubeconfig(work / "run", api.url)
        with netns_group(names) as paths:
            yield api, work, paths
    left = [n for n in names if os.path.exists(f"/var/run/netns/{n}")]
    assert left == [], f"namespaces not deleted: {left}"


def test_110_pods_added_and_deleted_concurrently(
    node: tuple[FakeApi, Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    api, work, paths = node
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

    adds = start_all("ADD", paths, conf, work)
    timed_out = wait_all(adds, PHASE_TIMEOUT)
    assert not (bad := problems(adds, timed_out)), "\n".join(bad[:10])
    for call in adds:
        assert json.loads(call.stdout)["ips"] == [{"address": "192.0.2.1/24"}]
    assert len(api.requests) == PODS, "every pod fetched exactly once (no retries)"

    incomplete = {}
    for i, path in enumerate(paths):
        save = in_netns(path, ["iptables-save"]).stdout
        missing = [c for c in ISTIO_NAT_CHAINS if f":{c} - " not in save]
        if missing or "-A OUTPUT -j ISTIO_OUTPUT" not in save:
            incomplete[i] = missing or ["the OUTPUT jump"]
    assert not incomplete, f"pods with incomplete rules: {incomplete}"

    dels = start_all("DEL", paths, conf, work)
    timed_out = wait_all(dels, PHASE_TIMEOUT)
    assert not (bad := problems(dels, timed_out)), "\n".join(bad[:10])
    left = [i for i, p in enumerate(paths) if "ISTIO" in in_netns(p, ["iptables-save"]).stdout]
    assert not left, f"pods with ISTIO rules after DEL: {left}"

    with capsys.disabled():
        print(f"\n110 concurrent ADD: {latencies(adds)}; DEL: {latencies(dels)}")
