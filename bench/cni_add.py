"""Benchmark: CNI ADD latency of `meshnet-cni`, against the reference bridge plugin's ADD.

Everything runs in a throw-away "node" namespace (entered by this process, so the plugin
processes it starts run there, as under a runtime): the bridge plugin (with host-local IPAM on
198.51.100.0/24) makes its bridge there, and a fake Kubernetes API listens on its 127.0.0.1.
Each pod gets its own namespace. Per pod: bridge ADD (the reference, timed), then meshnet-cni
ADD with the bridge's result as prevResult (timed: process start → rules applied → result
printed → exit). Two loads, as in SPEC.md §7:

- 1 pod: `--runs` sequential pods (default 20);
- `--pods` pods at once (default 110): all bridge ADDs started together, then all meshnet ADDs.

Every meshnet ADD must exit 0, leave the 4 ISTIO nat chains in its pod, and log no lock error.
Prints a table and writes bench/results/cni_add.json. Run as root:

    .venv/bin/python bench/cni_add.py [--runs 20] [--pods 110]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from meshnet import netns  # noqa: E402
from tests.cni.fakes import (  # noqa: E402
    FakeApi,
    cni_env,
    mesh_pod,
    netns_group,
    widen_backlog,
    write_kubeconfig,
)

RESULTS = REPO / "bench" / "results" / "cni_add.json"
SUBNET = "198.51.100.0/24"
BRIDGE = "mnt-bbr0"
TIMEOUT = 300.0
ISTIO_NAT_CHAINS = ("ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_REDIRECT")


@dataclass
class Sample:
    seconds: float
    code: int
    stdout: str
    stderr: str


def base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}


def bridge_conf(work: Path) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "bench",
        "type": "bridge",
        "bridge": BRIDGE,
        "isGateway": True,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": SUBNET}]],
            "dataDir": str(work / "ipam"),
        },
    }


def meshnet_conf(work: Path, prev: dict[str, Any]) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "bench",
        "type": "meshnet-cni",
        "cni_agent_run_dir": str(work / "run"),
        "pod_namespace": "istio-system",
        "prevResult": prev,
    }


def argv_for(plugin: str) -> list[str]:
    if plugin == "bridge":
        return ["/usr/lib/cni/bridge"]
    return [sys.executable, "-m", "meshnet.cni"]


def run_concurrently(jobs: list[tuple[str, dict[str, str], str]]) -> list[Sample]:
    """Start every (plugin, env, stdin) job at once (from this thread, so in its namespace);
    one waiter thread per process takes the exit time. Output goes to files, not pipes."""
    samples: list[Sample | None] = [None] * len(jobs)
    with tempfile.TemporaryDirectory(prefix="meshnet-bench-io-") as tmp:
        io = Path(tmp)
        procs: list[tuple[subprocess.Popen[bytes], float]] = []
        threads = []

        def wait(i: int, proc: subprocess.Popen[bytes], start: float) -> None:
            try:
                code = proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            elapsed = time.perf_counter() - start
            samples[i] = Sample(
                elapsed, code, (io / f"{i}.out").read_text(), (io / f"{i}.err").read_text()
            )

        try:
            for i, (plugin, env, stdin) in enumerate(jobs):
                (io / f"{i}.in").write_text(stdin)
                with (
                    (io / f"{i}.in").open("rb") as fin,
                    (io / f"{i}.out").open("wb") as fout,
                    (io / f"{i}.err").open("wb") as ferr,
                ):
                    start = time.perf_counter()
                    proc = subprocess.Popen(
                        argv_for(plugin), stdin=fin, stdout=fout, stderr=ferr, env=env
                    )
                procs.append((proc, start))
            for i, (proc, start) in enumerate(procs):
                thread = threading.Thread(target=wait, args=(i, proc, start))
                thread.start()
                threads.append(thread)
        finally:
            for proc, _ in procs[len(threads) :]:
                proc.kill()
                proc.wait()
            for thread in threads:
                thread.join()
    return [s for s in samples if s is not None]


def run_one(plugin: str, env: dict[str, str], stdin: str) -> Sample:
    start = time.perf_counter()
    done = subprocess.run(
        argv_for(plugin), input=stdin, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    return Sample(time.perf_counter() - start, done.returncode, done.stdout, done.stderr)


def env_for(command: str, path: str, i: int) -> dict[str, str]:
    return {**base_env(), **cni_env(command, path, f"web-{i:03d}", container_id=f"ctr-{i:03d}")}


def rules_complete(path: str) -> bool:
    save = subprocess.run(
        ["ip", "netns", "exec", path.rsplit("/", 1)[-1], "iptables-save"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return all(f":{chain} - " in save for chain in ISTIO_NAT_CHAINS)


def lock_lines(samples: list[Sample]) -> int:
    return sum(1 for s in samples for line in s.stderr.splitlines() if "lock" in line.lower())


def stats(samples: list[Sample]) -> dict[str, Any]:
    times = sorted(s.seconds for s in samples)
    rank = max(1, math.ceil(0.99 * len(times)))  # nearest-rank p99
    return {
        "n": len(times),
        "p50": round(statistics.median(times), 4),
        "p99": round(times[rank - 1], 4),
        "max": round(times[-1], 4),
        "mean": round(statistics.fmean(times), 4),
        "failures": sum(1 for s in samples if s.code != 0),
        "lock_lines": lock_lines(samples),
    }


@dataclass
class Round:
    bridge: list[Sample]
    meshnet: list[Sample]
    incomplete: int  # meshnet pods without their 4 ISTIO nat chains


def chain(work: Path, paths: list[str], first: int, concurrent: bool) -> Round:
    """bridge ADDs, then meshnet ADDs (prevResult = bridge's), for pods first..first+n."""
    bridge_stdin = json.dumps(bridge_conf(work))
    jobs = [("bridge", env_for("ADD", p, first + k), bridge_stdin) for k, p in enumerate(paths)]
    bridge = run_concurrently(jobs) if concurrent else [run_one(*job) for job in jobs]
    failed = [s.stderr or s.stdout for s in bridge if s.code != 0]
    if failed:
        sys.exit(f"bridge ADD failed: {failed[0]}")
    prevs = [json.loads(s.stdout) for s in bridge]
    jobs = [
        ("meshnet", env_for("ADD", path, first + k), json.dumps(meshnet_conf(work, prev)))
        for k, (path, prev) in enumerate(zip(paths, prevs, strict=True))
    ]
    mesh = run_concurrently(jobs) if concurrent else [run_one(*job) for job in jobs]
    incomplete = sum(1 for path in paths if not rules_complete(path))
    # give the addresses back (bridge DEL, host-local release), untimed
    run_concurrently(
        [("bridge", env_for("DEL", p, first + k), bridge_stdin) for k, p in enumerate(paths)]
    )
    return Round(bridge, mesh, incomplete)


@contextmanager
def node(work: Path, pods: int) -> Iterator[tuple[str, FakeApi]]:
    name = f"mnt-bench-{secrets.token_hex(3)}-node"
    with netns_group([name], address=None):
        with netns.entered(name):
            api = FakeApi()  # its socket, hence 127.0.0.1, belongs to the node namespace
        with api:
            widen_backlog(api)
            for i in range(pods):
                api.pods[("default", f"web-{i:03d}")] = mesh_pod(f"web-{i:03d}")
            write_kubeconfig(work / "run", api.url)
            yield name, api


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="sequential single-pod ADDs")
    parser.add_argument("--pods", type=int, default=110, help="concurrent pods")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark creates network namespaces")
    if args.runs + args.pods > 250:
        sys.exit("--runs + --pods must fit in one /24")

    load_before = os.getloadavg()
    single = Round([], [], 0)
    with tempfile.TemporaryDirectory(prefix="meshnet-bench-") as tmp:
        work = Path(tmp)
        with node(work, args.runs + args.pods) as (node_name, _api):
            suffix = node_name.split("-")[2]
            for i in range(args.runs):
                with netns_group([f"mnt-bench-{suffix}-s{i:03d}"], address=None) as paths:
                    with netns.entered(node_name):
                        one = chain(work, paths, i, concurrent=False)
                single.bridge += one.bridge
                single.meshnet += one.meshnet
                single.incomplete += one.incomplete
            names = [f"mnt-bench-{suffix}-c{i:03d}" for i in range(args.pods)]
            with netns_group(names, address=None) as paths:
                with netns.entered(node_name):
                    many = chain(work, paths, args.runs, concurrent=True)

    rows = {}
    for key, rnd in (("one_pod", single), ("concurrent", many)):
        rows[key] = {
            "bridge": stats(rnd.bridge),
            "meshnet": {**stats(rnd.meshnet), "incomplete": rnd.incomplete},
        }
    report = {
        "machine": {"cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before]},
        "runs": args.runs,
        "pods": args.pods,
        **rows,
        "ratio_meshnet_to_bridge_p50": {
            key: round(row["meshnet"]["p50"] / row["bridge"]["p50"], 2) for key, row in rows.items()
        },
    }
    print_table(report)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {RESULTS.relative_to(REPO)}")
    mesh_rows = [row["meshnet"] for row in rows.values()]
    if any(r["failures"] or r["incomplete"] or r["lock_lines"] for r in mesh_rows):
        sys.exit("meshnet-cni ADD failed, left incomplete rules or logged lock errors")


def print_table(report: dict[str, Any]) -> None:
    print(f"CNI ADD latency in seconds ({report['machine']['cpus']} CPUs)")
    print(f"{'plugin, load':48} {'n':>4} {'p50':>7} {'p99':>7} {'max':>7} {'fail':>5}")
    for label, key in (("1 pod", "one_pod"), (f"{report['pods']} concurrent", "concurrent")):
        for plugin, name in (
            ("bridge", "bridge + host-local (reference)"),
            ("meshnet", "meshnet-cni"),
        ):
            row = report[key][plugin]
            print(
                f"{name + ', ' + label:48} {row['n']:>4} {row['p50']:>7.3f} {row['p99']:>7.3f}"
                f" {row['max']:>7.3f} {row['failures']:>5}"
            )
    ratio = report["ratio_meshnet_to_bridge_p50"]
    print(
        f"meshnet/bridge p50: 1 pod {ratio['one_pod']}x, "
        f"{report['pods']} concurrent {ratio['concurrent']}x"
    )


if __name__ == "__main__":
    main()
