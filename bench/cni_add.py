"""Benchmark: CNI ADD and DEL latency of `meshnet-cni`, through the agent and through its
fallback, against the reference bridge plugin's ADD in the same run.

Everything runs in a throw-away "node" namespace (entered by this process, so the plugin
processes it starts run there, as under a runtime): the bridge plugin (with host-local IPAM on
198.51.100.0/24) makes its bridge there, a fake Kubernetes API listens on its 127.0.0.1, and
`meshnet cni agent` serves the forwarder from there. Each pod gets its own namespace. Per pod:
bridge ADD (the reference, timed), then meshnet-cni ADD with the bridge's result as prevResult
(timed: process start -> rules applied -> result printed -> exit), meshnet-cni DEL (timed),
bridge DEL (untimed). `meshnet-cni` is the installed forwarder (cni-plugin/build.sh); its
fallback is this checkout's plugin under the venv's Python, or with `--dist OUT` the
PyInstaller build in OUT.

Two paths, each at three loads: `agent` (the agent serves the forwarder) and `fallback` (the
agent stopped: the forwarder execs the standalone plugin); 1 pod at a time (`--runs`
sequential pods, default 10), 16 pods at once, 110 pods at once (all bridge ADDs started
together, then all meshnet ADDs, then all DELs).

Every meshnet call must exit 0, every ADD leave the 4 ISTIO nat chains in its pod, and no call
log a lock error. Prints a table and writes bench/results/cni_add.json. Run as root:

    .venv/bin/python bench/cni_add.py [--runs 10] [--loads 1,16,110] [--dist OUT]
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

from meshnet.host import netns  # noqa: E402
from tests.cni.agents import Agent, build_forwarder, plugin_dir  # noqa: E402
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


PLUGIN: dict[str, Path] = {}  # "meshnet": the installed forwarder (set in main)


def argv_for(plugin: str) -> list[str]:
    if plugin == "bridge":
        return ["/usr/lib/cni/bridge"]
    return [str(PLUGIN["meshnet"])]


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
    add: list[Sample]
    delete: list[Sample]
    incomplete: int  # meshnet pods without their 4 ISTIO nat chains
    fell_back: int  # meshnet calls the forwarder handed to the standalone plugin

    def __iadd__(self, other: Round) -> Round:
        self.bridge += other.bridge
        self.add += other.add
        self.delete += other.delete
        self.incomplete += other.incomplete
        self.fell_back += other.fell_back
        return self


def run_jobs(jobs: list[tuple[str, dict[str, str], str]], concurrent: bool) -> list[Sample]:
    return run_concurrently(jobs) if concurrent else [run_one(*job) for job in jobs]


def chain(work: Path, paths: list[str], tag: str, concurrent: bool) -> Round:
    """bridge ADDs, then meshnet ADDs (prevResult = bridge's), then meshnet DELs."""
    bridge_stdin = json.dumps(bridge_conf(work))

    def env(command: str, k: int, path: str) -> dict[str, str]:
        return {**env_for(command, path, k), "CNI_CONTAINERID": f"ctr-{tag}-{k:03d}"}

    jobs = [("bridge", env("ADD", k, p), bridge_stdin) for k, p in enumerate(paths)]
    bridge = run_jobs(jobs, concurrent)
    failed = [s.stderr or s.stdout for s in bridge if s.code != 0]
    if failed:
        sys.exit(f"bridge ADD failed: {failed[0]}")
    stdins = [json.dumps(meshnet_conf(work, json.loads(s.stdout))) for s in bridge]
    jobs = [("meshnet", env("ADD", k, p), stdins[k]) for k, p in enumerate(paths)]
    add = run_jobs(jobs, concurrent)
    incomplete = sum(1 for path in paths if not rules_complete(path))
    jobs = [("meshnet", env("DEL", k, p), stdins[k]) for k, p in enumerate(paths)]
    delete = run_jobs(jobs, concurrent)
    # give the addresses back (bridge DEL, host-local release), untimed
    run_concurrently([("bridge", env("DEL", k, p), bridge_stdin) for k, p in enumerate(paths)])
    fell_back = sum(1 for s in add + delete if "running the standalone plugin" in s.stderr)
    return Round(bridge, add, delete, incomplete, fell_back)


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


def measure(
    work: Path, node_name: str, paths: list[str], loads: list[int], runs: int, path: str
) -> dict[str, Round]:
    rounds: dict[str, Round] = {}
    for load in loads:
        rnd = Round([], [], [], 0, 0)
        with netns.entered(node_name):
            if load == 1:
                for i in range(runs):
                    rnd += chain(work, paths[i : i + 1], f"{path}-1-{i}", concurrent=False)
            else:
                rnd += chain(work, paths[:load], f"{path}-{load}", concurrent=True)
        rounds[str(load)] = rnd
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="sequential single-pod calls")
    parser.add_argument("--loads", default="1,16,110", help="pods at once (comma list)")
    parser.add_argument("--dist", type=Path, help="a cni-plugin/build.sh output dir to use")
    args = parser.parse_args()
    loads = [int(x) for x in args.loads.split(",")]
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark creates network namespaces")
    pods = max([args.runs, *loads])
    if pods > 250:
        sys.exit("--runs and every load must fit in one /24")

    load_before = os.getloadavg()
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before]},
        "runs": args.runs,
        "loads": loads,
        "fallback_plugin": "PyInstaller build" if args.dist else "venv python -m meshnet.cni",
    }
    with tempfile.TemporaryDirectory(prefix="meshnet-bench-") as tmp:
        work = Path(tmp)
        if args.dist:
            PLUGIN["meshnet"] = args.dist.resolve() / "meshnet-cni"
        else:
            PLUGIN["meshnet"] = plugin_dir(work / "bin", build_forwarder(work / "build"))
        with node(work, pods) as (node_name, _api):
            suffix = node_name.split("-")[2]
            names = [f"mnt-bench-{suffix}-p{i:03d}" for i in range(pods)]
            with netns_group(names, address=None) as paths:
                with Agent(work / "run", netns=node_name):
                    served = measure(work, node_name, paths, loads, args.runs, "agent")
                fallback = measure(work, node_name, paths, loads, args.runs, "fallback")
    for path, rounds in (("agent", served), ("fallback", fallback)):
        report[path] = {
            load: {
                "bridge_add": stats(rnd.bridge),
                "meshnet_add": {**stats(rnd.add), "incomplete": rnd.incomplete},
                "meshnet_del": stats(rnd.delete),
                "fell_back": rnd.fell_back,
                "ratio_add_to_bridge_p50": round(
                    statistics.median(s.seconds for s in rnd.add)
                    / statistics.median(s.seconds for s in rnd.bridge),
                    2,
                ),
            }
            for load, rnd in rounds.items()
        }
    print_table(report)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {RESULTS.relative_to(REPO)}")
    problems = []
    for path in ("agent", "fallback"):
        for load, row in report[path].items():
            mesh = (row["meshnet_add"], row["meshnet_del"])
            if (
                any(r["failures"] or r["lock_lines"] for r in mesh)
                or row["meshnet_add"]["incomplete"]
            ):
                problems.append(f"{path} at {load}: failures, incomplete rules or lock errors")
            calls = row["meshnet_add"]["n"] + row["meshnet_del"]["n"]
            if row["fell_back"] != (0 if path == "agent" else calls):
                problems.append(f"{path} at {load}: {row['fell_back']} of {calls} fell back")
    if problems:
        sys.exit("; ".join(problems))


def print_table(report: dict[str, Any]) -> None:
    print(f"CNI latency in seconds, p50 (p99) ({report['machine']['cpus']} CPUs)")
    print(f"fallback plugin: {report['fallback_plugin']}")
    head = f"{'path':9} {'pods':>5} {'bridge ADD':>15} {'meshnet ADD':>15} {'meshnet DEL':>15}"
    print(head + f" {'ADD/bridge':>10} {'fail':>5}")
    for path in ("agent", "fallback"):
        for load, row in report[path].items():
            cells = [
                f"{row[key]['p50']:.3f} ({row[key]['p99']:.3f})"
                for key in ("bridge_add", "meshnet_add", "meshnet_del")
            ]
            fails = row["meshnet_add"]["failures"] + row["meshnet_del"]["failures"]
            print(
                f"{path:9} {load:>5} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15}"
                f" {row['ratio_add_to_bridge_p50']:>9}x {fails:>5}"
            )


if __name__ == "__main__":
    main()
