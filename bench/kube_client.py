"""Kubernetes client for the repair controller's watch: the `kubernetes` package vs stdlib.

For each candidate, fresh processes (interleaved with the floor, `python -c pass`) import what
the controller would use, then report their own peak RSS. The `kubernetes` package is not a
dependency; point `--kubernetes-python` at an interpreter that has it (for example a scratch
venv: `python3 -m venv /tmp/k8s && /tmp/k8s/bin/pip install kubernetes`). Also prints the
on-disk size of the imported packages, which the node image would carry.

    .venv/bin/python bench/kube_client.py [--runs 15] [--kubernetes-python /tmp/k8s/bin/python]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Stats, machine, write_result

PROBE = """
import json, resource, sys, time
start = time.perf_counter()
for name in sys.argv[1].split(","):
    if name:
        __import__(name)
seconds = time.perf_counter() - start
roots = {m.split(".")[0] for m in sys.modules}
print(json.dumps({"seconds": seconds, "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "modules": len(sys.modules), "roots": sorted(roots)}))
"""
STDLIB = "meshnet.cni.kube.agent_client"
CLIENT = "kubernetes.client,kubernetes.config,kubernetes.watch"


def sample(python: str, modules: str) -> dict[str, object]:
    out = subprocess.run(
        [python, "-c", PROBE, modules], capture_output=True, text=True, check=False, timeout=120
    )
    if out.returncode != 0:
        sys.exit(f"{python}: cannot import {modules}: {out.stderr.strip().splitlines()[-1:]}")
    result: dict[str, object] = json.loads(out.stdout)
    return result


def package_size(python: str, roots: list[str]) -> int:
    """Bytes on disk of the imported third-party top-level packages."""
    code = (
        "import importlib.util, os, sys, sysconfig\n"
        "std = sysconfig.get_paths()['stdlib']\n"
        "total = 0\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        spec = importlib.util.find_spec(name)\n"
        "    except (ImportError, ValueError):\n"
        "        continue\n"
        "    if not spec or not spec.origin or spec.origin.startswith(std) "
        "or 'site-packages' not in spec.origin:\n"
        "        continue\n"
        "    root = os.path.dirname(spec.origin) if spec.submodule_search_locations "
        "else spec.origin\n"
        "    for d, _, files in os.walk(root):\n"
        "        total += sum(os.path.getsize(os.path.join(d, f)) for f in files)\n"
        "print(total)\n"
    )
    out = subprocess.run([python, "-c", code, *roots], capture_output=True, text=True, check=True)
    return int(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--kubernetes-python", default=sys.executable)
    args = parser.parse_args()
    candidates = {
        "floor (python -c pass)": (sys.executable, ""),
        "stdlib watch (meshnet.cni.kube.agent_client)": (sys.executable, STDLIB),
        "kubernetes client": (args.kubernetes_python, CLIENT),
    }
    runs: dict[str, list[dict[str, object]]] = {name: [] for name in candidates}
    for _ in range(args.runs + 2):
        for name, (python, modules) in candidates.items():
            runs[name].append(sample(python, modules))
    document: dict[str, object] = {"machine": machine(), "results": {}}
    print(f"{'candidate':38} {'import':>34} {'peak RSS':>10} {'on disk':>9}")
    for name, (python, _) in candidates.items():
        kept = runs[name][2:]  # two warm-up rounds (page cache, .pyc)
        stats = Stats.of([float(str(r["seconds"])) for r in kept])
        rss = sorted(int(str(r["rss_kb"])) for r in kept)[len(kept) // 2]
        roots = [str(root) for root in kept[-1]["roots"]]  # type: ignore[attr-defined]
        disk = package_size(python, roots) if name.startswith("kubernetes") else 0
        print(f"{name:38} {stats.ms():>34} {rss / 1024:7.1f} MB {disk / 2**20:6.1f} MB")
        results = document["results"]
        assert isinstance(results, dict)
        results[name] = {"import": stats.as_dict(), "rss_kb": rss, "disk_bytes": disk}
    print("import: time inside the process after start; peak RSS: the floor is the interpreter")
    print(f"written: {write_result('kube_client', document)}")


if __name__ == "__main__":
    main()
