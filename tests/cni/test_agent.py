"""`meshnet cni agent` and the C forwarder: the socket, its guard, the wire, the worker pool.

The plugin's behaviour through the agent (rules, skips, API faults, CHECK/DEL, traffic, 110
pods) is tested by test_plugin.py, test_libcni_chain.py and test_load.py over both paths.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshnet import logs
from meshnet.cni import agent as agent_mod
from meshnet.cni import pool as pool_mod
from meshnet.cni import wire
from meshnet.cni.plugin import main
from meshnet.host import netns
from tests.cni.agents import Agent, forwarder_dir, run_forwarder
from tests.cni.fakes import FakeApi, cni_env, mesh_pod, pod_namespace, write_kubeconfig
from tests.netns.harness import require_root_netns

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def forwarder() -> Iterator[Path]:
    with forwarder_dir() as path:
        yield path


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def netconf(run_dir: Path | str, **extra: Any) -> str:
    conf = {
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "meshnet-cni",
        "cni_agent_run_dir": str(run_dir),
        "pod_fetch_attempts": 2,
        "pod_fetch_interval": 0.1,
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "192.0.2.1/24"}]},
        **extra,
    }
    return json.dumps(conf)


def events(agent: Agent, name: str) -> list[dict[str, Any]]:
    return [r for r in agent.records() if r.get("event") == name]


# --------------------------------------------------------------------------- the forwarder


def test_forwarder_answers_version_and_usage_exactly_as_the_plugin(forwarder: Path) -> None:
    version = run_forwarder(forwarder, {"CNI_COMMAND": "VERSION"}, "")
    assert (version.stdout, version.returncode) == main.respond("", {"CNI_COMMAND": "VERSION"})
    usage = run_forwarder(forwarder, {}, "")
    assert (usage.stdout, usage.stderr, usage.returncode) == ("", main.USAGE, 1)


class OneShotServer:
    """A socket at <dir>/meshnet-cni.sock that reads one request and then does `behaviour`."""

    def __init__(self, run_dir: Path, behaviour: str) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(run_dir / agent_mod.SOCKET_NAME))
        self.sock.listen(1)
        self.behaviour = behaviour
        self.request: wire.Request | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            if self.behaviour == "close-unread":
                return
            self.request = wire.read_request(conn)
            if self.behaviour == "close-after-ack":
                conn.sendall(wire.ACK)
            elif self.behaviour == "answer":
                conn.sendall(wire.ACK + struct_reply(3, "from the agent\n"))

    def close(self) -> None:
        self.thread.join(10)
        self.sock.close()


def struct_reply(code: int, stdout: str) -> bytes:
    data = stdout.encode()
    return code.to_bytes(4, "big") + len(data).to_bytes(4, "big") + data


def test_forwarder_sends_command_env_and_stdin_and_relays_the_reply(
    forwarder: Path, tmp_path: Path
) -> None:
    # The run dir is found in a netconf whose other fields need real JSON skipping.
    run_dir = tmp_path / 'r"un'
    conf = json.dumps(
        {
            "cniVersion": "1.0.0",
            "nested": {"cni_agent_run_dir": "/wrong", "list": [1, {"a": "}"}]},
            "text": 'a "quoted" \\ value, with } and ]',
            "cni_agent_run_dir": str(run_dir),
        }
    )
    server = OneShotServer(run_dir, "answer")
    env = {**cni_env("ADD", "/var/run/netns/x"), "DRY_RUN_FILE_PATH": "/tmp/x"}
    result = run_forwarder(forwarder, env, conf)
    server.close()
    assert (result.returncode, result.stdout) == (3, "from the agent\n")
    assert server.request is not None
    assert server.request.command == "ADD" and server.request.stdin == conf
    assert server.request.env["CNI_NETNS"] == "/var/run/netns/x"
    assert server.request.env["DRY_RUN_FILE_PATH"] == "/tmp/x"


def test_forwarder_reports_a_reply_lost_after_the_agent_took_the_call(
    forwarder: Path, run_dir: Path
) -> None:
    server = OneShotServer(run_dir, "close-after-ack")
    result = run_forwarder(forwarder, cni_env("ADD", "/x"), netconf(run_dir, cniVersion="0.4.0"))
    server.close()
    assert result.returncode == 1
    error = json.loads(result.stdout)
    assert error["cniVersion"] == "0.4.0" and error["code"] == 999
    assert "lost the agent's reply" in error["msg"] and str(run_dir) in error["msg"]


@pytest.mark.parametrize("how", ["no-socket", "closed-before-ack", "closed-unread"])
def test_forwarder_runs_the_standalone_plugin_when_the_agent_is_unreachable(
    forwarder: Path, run_dir: Path, how: str
) -> None:
    server = None
    if how != "no-socket":
        server = OneShotServer(run_dir, "close" if how == "closed-before-ack" else "close-unread")
    # A netconf too big for the socket buffers: the forwarder is still writing when the
    # connection closes (an error, never a SIGPIPE).
    conf = netconf(run_dir, cniVersion="1.1.0", padding="x" * (4 << 20))
    # STATUS needs no namespace and no API: the standalone plugin answers it itself.
    result = run_forwarder(forwarder, {"CNI_COMMAND": "STATUS"}, conf)
    if server is not None:
        server.close()
    assert (result.returncode, result.stdout) == (0, ""), result.stderr
    warning = json.loads(result.stderr.splitlines()[0])
    assert warning["level"] == "warning"
    assert "agent unreachable; running the standalone plugin" in warning["event"]
    assert warning["socket"] == str(run_dir / agent_mod.SOCKET_NAME)


def test_forwarder_without_its_fallback_prints_a_cni_error(
    forwarder: Path, tmp_path: Path, run_dir: Path
) -> None:
    lonely = tmp_path / "bin" / "meshnet-cni"
    lonely.parent.mkdir()
    lonely.write_bytes(forwarder.read_bytes())
    lonely.chmod(0o755)
    result = run_forwarder(lonely, cni_env("ADD", "/x"), netconf(run_dir))
    assert result.returncode == 1
    error = json.loads(result.stdout)
    assert error["code"] == 999 and "standalone plugin" in error["msg"], error
    assert "cannot run" in error["msg"]


# --------------------------------------------------------------------------- the socket


def test_socket_is_root_only_and_sigterm_removes_it(run_dir: Path) -> None:
    agent = Agent(run_dir).start()
    try:
        assert os.stat(run_dir).st_mode & 0o777 == 0o700
        assert os.stat(agent.socket).st_mode & 0o777 == 0o600
        assert os.stat(agent.socket).st_uid == 0
        second = Agent(run_dir)
        with pytest.raises(RuntimeError, match="another agent already serves"):
            second.start(timeout=20)
        second.close()
        assert agent.socket.exists()
    finally:
        code = agent.stop()
    assert code == 0
    assert not agent.socket.exists()
    assert events(agent, "stopped")
    agent.close()


def test_a_stale_socket_is_replaced(run_dir: Path) -> None:
    run_dir.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(run_dir / agent_mod.SOCKET_NAME))
    stale.close()  # bound, never listening: what a killed agent leaves
    with Agent(run_dir) as agent:
        assert agent.serving()


def _connect_as_1337(path: Path, keep_dac_override: bool) -> str:
    """Connect to `path` from a child running as uid 1337; returns what it saw."""
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        f"    s.connect({str(path)!r})\n"
        "except OSError as e:\n"
        "    print('connect', e.errno); sys.exit()\n"
        "s.settimeout(10)\n"
        "try:\n"
        "    s.sendall(b'MCA1')\n"
        "    print('ack' if s.recv(1) == b'A' else 'closed')\n"
        "except (BrokenPipeError, ConnectionResetError):\n"
        "    print('closed')\n"
    )
    caps = ["--inh-caps=+dac_override", "--ambient-caps=+dac_override"] if keep_dac_override else []
    argv = ["setpriv", "--reuid=1337", "--regid=1337", "--clear-groups", *caps]
    done = subprocess.run(
        [*argv, "/usr/bin/python3", "-I", "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_caller_that_is_not_root_is_refused(run_dir: Path) -> None:
    import errno

    with FakeApi() as api, Agent(run_dir) as agent:
        write_kubeconfig(run_dir, api.url)
        # the file mode stops it first...
        assert _connect_as_1337(agent.socket, keep_dac_override=False) == f"connect {errno.EACCES}"
        # ...and a uid-1337 process that may bypass file modes is refused by its credentials
        assert _connect_as_1337(agent.socket, keep_dac_override=True) == "closed"
        deadline = time.monotonic() + 10
        while (
            not events(agent, "refused a caller that is not root") and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        refused = events(agent, "refused a caller that is not root")
        assert refused and refused[0]["peer_uid"] == 1337, agent.records()
        assert api.requests == [] and not events(agent, "cni request done")


# --------------------------------------------------------------------------- the pool


def test_threads_tools_and_sockets_follow_the_thread_namespace() -> None:
    """What the agent relies on: a worker thread in a pod's namespace starts its tools, opens
    its sockets and starts its threads there, while the other threads stay in the agent's."""
    require_root_netns()
    home = netns.current_inode()
    seen: dict[str, int] = {}
    inside, looked = threading.Event(), threading.Event()
    with pod_namespace() as path:
        pod = os.stat(path).st_ino

        def worker() -> None:
            with netns.entered(path):
                out = subprocess.run(
                    ["stat", "-L", "-c", "%i", "/proc/self/ns/net"],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                seen["tool"] = int(out.stdout)
                seen["its thread"] = in_new_thread()
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.bind(("192.0.2.1", 0))  # only the pod has this address
                inside.set()
                looked.wait(10)
            seen["after"] = netns.current_inode()

        def in_new_thread() -> int:
            result: list[int] = []
            thread = threading.Thread(target=lambda: result.append(netns.current_inode()))
            thread.start()
            thread.join()
            return result[0]

        thread = threading.Thread(target=worker)
        thread.start()
        assert inside.wait(10)
        seen["main thread"] = netns.current_inode()
        looked.set()
        thread.join()
    assert seen == {"tool": pod, "its thread": pod, "main thread": home, "after": home}


@pytest.fixture
def served(run_dir: Path) -> Iterator[tuple[FakeApi, list[pool_mod.Finished], Path]]:
    """An in-process agent (so hooks can be seen) and a kept-alive API."""
    require_root_netns()
    finished: list[pool_mod.Finished] = []
    with FakeApi(keep_alive=True) as api:
        write_kubeconfig(run_dir, api.url)
        server = agent_mod.Agent(agent_mod.Settings(run_dir, workers=4), [finished.append])
        server.start()
        try:
            yield api, finished, run_dir
        finally:
            server.stop()


def test_pods_run_in_parallel_one_containers_calls_in_order_one_api_connection(
    served: tuple[FakeApi, list[pool_mod.Finished], Path], forwarder: Path
) -> None:
    api, finished, run_dir = served
    with pod_namespace() as first, pod_namespace() as second:
        for name in ("web-0", "web-1", "web-2"):
            api.pods[("default", name)] = mesh_pod(name)
        ok = run_forwarder(
            forwarder, cni_env("ADD", first, "web-2", container_id="c-2"), netconf(run_dir)
        )
        assert ok.returncode == 0, ok.stdout
        api.delay = 1.0
        calls = [
            ("ADD", first, "web-0", "c-0"),
            ("DEL", first, "web-0", "c-0"),  # queued behind c-0's ADD, which waits for the API
            ("ADD", second, "web-1", "c-1"),
        ]
        threads = []
        results: dict[str, subprocess.CompletedProcess[str]] = {}
        for command, ns, pod, ctr in calls:

            def call(command: str = command, ns: str = ns, pod: str = pod, ctr: str = ctr) -> None:
                env = cni_env(command, ns, pod, container_id=ctr)
                results[f"{command} {ctr}"] = run_forwarder(forwarder, env, netconf(run_dir))

            threads.append(threading.Thread(target=call))
            threads[-1].start()
            time.sleep(0.2)  # the order the runtime sends them in
        for thread in threads:
            thread.join()
    assert all(r.returncode == 0 for r in results.values()), results
    order = [(f.command, f.container) for f in finished if f.container == "c-0"]
    assert order == [("ADD", "c-0"), ("DEL", "c-0")], "a container's DEL overtook its ADD"
    assert api.most_at_once == 2, "two pods' GETs should have been in flight together"
    assert len(api.clients) == 2, f"the API saw {len(api.clients)} connections for 3 GETs"
    done = {(f.command, f.container): f for f in finished}
    assert done[("ADD", "c-1")].pod == "default/web-1" and done[("ADD", "c-1")].exit_code == 0
    assert all(f.seconds > 0 and f.queue_depth >= 0 for f in finished)


def test_a_call_past_its_deadline_gets_a_cni_error(run_dir: Path, forwarder: Path) -> None:
    require_root_netns()
    with FakeApi() as api, pod_namespace() as ns:
        api.pods[("default", "web-0")] = mesh_pod()
        api.delay = 3.0
        write_kubeconfig(run_dir, api.url)
        with Agent(run_dir, MESHNET_CNI_AGENT_DEADLINE="1") as agent:
            result = run_forwarder(forwarder, cni_env("ADD", ns), netconf(run_dir))
            assert result.returncode == 1
            error = json.loads(result.stdout)
            assert error["code"] == 999 and "deadline of 1 s" in error["msg"], error
            assert agent.stop() == 0  # waits for the late call to end
            late = events(agent, "cni request done")
            assert late and late[0]["after_deadline"] is True
            assert late[0]["pod"] == "default/web-0"
            assert events(agent, "cni request exceeded its deadline")[0]["container"] == "ctr-0"


def test_bad_settings_are_one_line_naming_the_variable(run_dir: Path) -> None:
    env = {**os.environ, "CNI_AGENT_RUN_DIR": str(run_dir), "MESHNET_CNI_AGENT_WORKERS": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "meshnet", "cni", "agent"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    assert "MESHNET_CNI_AGENT_WORKERS='0'" in done.stderr
    assert not run_dir.exists()


def test_a_failing_hook_is_logged_and_the_others_still_run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[pool_mod.Finished] = []

    def broken(finished: pool_mod.Finished) -> None:
        raise RuntimeError("metrics down")

    monkeypatch.setattr(logs._Settings, "logger", logs._Settings.logger)  # restored afterwards
    logs.configure("json")
    pool = pool_mod.Pool(1, [broken, seen.append], netns.current_inode())
    job = pool_mod.Job(wire.Request("VERSION", {"CNI_COMMAND": "VERSION"}, ""))
    pool.submit(job)
    assert job.done.wait(10)
    pool.stop()
    assert job.code == 0 and "supportedVersions" in job.output
    assert [(f.command, f.exit_code, f.queue_depth, f.timed_out) for f in seen] == [
        ("VERSION", 0, 0, False)
    ]
    assert "request hook failed" in capsys.readouterr().err
