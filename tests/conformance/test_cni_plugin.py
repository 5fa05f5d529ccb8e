"""Istio's CNI plugin dry-run goldens (`cni/pkg/plugin/testdata`), through the plugin process."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cni.agents import Agent, forwarder_dir, through_agent
from tests.cni.fakes import FakeApi, get_rules, pod_namespace, run_plugin, write_kubeconfig
from tests.conftest import RAN
from tests.netns.harness import require_root_netns
from tests.support.conformance import CONFORMANCE, conformance_cases

SUITE = CONFORMANCE / "cni-plugin"


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Path, Path]]:
    """The forwarder and the run dir of an agent serving it."""
    with forwarder_dir() as forwarder, tempfile.TemporaryDirectory(prefix="meshnet-agent-") as tmp:
        with Agent(Path(tmp) / "run") as agent:
            yield forwarder, agent.run_dir


@pytest.mark.parametrize("path", ["plugin", "agent"])
@pytest.mark.parametrize("case", conformance_cases("cni-plugin"))
def test_cni_plugin_golden(
    case: dict[str, Any], tmp_path: Path, path: str, request: pytest.FixtureRequest
) -> None:
    """Through the plugin process, and through the forwarder to a resident agent."""
    require_root_netns()
    netconf = json.loads((SUITE / case["netconf"]).read_text())
    netconf["cni_agent_run_dir"] = str(tmp_path / "run")
    transcript = tmp_path / "dry-run.txt"
    transcript.touch()
    meta = case["pod"]["metadata"]
    with FakeApi() as api, pod_namespace() as netns:
        api.pods[(meta["namespace"], meta["name"])] = case["pod"]
        write_kubeconfig(tmp_path / "run", api.url)
        env = {
            **case["cni_args"],
            **case["env"],
            "CNI_NETNS": netns,
            "CNI_PATH": "/usr/lib/cni",
            "DRY_RUN_FILE_PATH": str(transcript),
        }
        if path == "agent":
            forwarder, agent_dir = request.getfixturevalue("served")
            result = through_agent(forwarder, agent_dir, env, json.dumps(netconf))
        else:
            result = run_plugin(env, json.dumps(netconf))
    assert result.returncode == 0, result.stdout + result.stderr
    printed = json.loads(result.stdout)
    assert printed["ips"] == netconf["prevResult"]["ips"]
    got = get_rules(transcript.read_text())
    want = get_rules((SUITE / case["golden"]).read_text())
    assert got and got == want
    suite = "cni-plugin" if path == "plugin" else "cni-plugin (through the agent)"
    RAN[suite] = RAN.get(suite, 0) + 1
