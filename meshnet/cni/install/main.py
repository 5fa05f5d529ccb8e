"""The installer process (`meshnet cni install`): signals, the HTTP servers, the repair
controller and the in-process agent around the `Installer`, and `main()`."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from meshnet import logs
from meshnet.cni import metrics, repair
from meshnet.cni.install.http import serve_metrics, serve_readiness
from meshnet.cni.install.installer import Installer
from meshnet.cni.install.settings import ENV_OPTIONS, Settings
from meshnet.cni.kube import agent_client, plugin_client
from meshnet.errors import InstallError, MeshnetError

if TYPE_CHECKING:
    from meshnet.cni import agent

_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _start_agent(settings: Settings) -> agent.Agent | None:
    """The node agent in this process (MESHNET_CNI_AGENT=true): one resident process per node
    that installs, repairs and serves the per-pod CNI calls, its requests counted in /metrics."""
    if not settings.agent:
        return None
    from meshnet.cni import agent

    environ = {**os.environ, "CNI_AGENT_RUN_DIR": str(settings.run_dir)}
    node_agent = agent.Agent(agent.Settings.from_env(environ), hooks=(metrics.record_call,))
    node_agent.start()
    return node_agent


def start_repair(settings: Settings) -> repair.Controller | None:
    """The repair controller in a daemon thread, reading the plugin's kubeconfig; None when
    disabled, or when no node name is known (watching every node's pods from here is wrong:
    their namespaces are not on this host)."""
    options = settings.repair
    if not options.enabled:
        logs.get().info("repair controller disabled (REPAIR_ENABLED=false)")
        return None
    if not options.node_name:
        logs.get().warning(
            "repair controller not started: set REPAIR_NODE_NAME or KUBERNETES_NODE_NAME"
        )
        return None
    path = str(settings.kubeconfig_path)
    controller = repair.Controller(
        options, agent_client.PodApi(lambda: plugin_client.load_kubeconfig(path))
    )
    controller.start()
    return controller


def run(settings: Settings) -> int:
    """Install and keep the plugin until SIGTERM/SIGINT, then clean up. Returns the exit code.

    The signals are blocked and taken synchronously (sigtimedwait) by this thread while the
    install loop runs in a worker: no handler ever interrupts a half-written file. They stay
    blocked on return, so a second SIGTERM cannot kill the process on its way out.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)  # before any thread starts
    stop = threading.Event()
    installer = Installer(settings, stop)
    logs.get().info("starting", conf_dir=str(settings.conf_dir), chained=settings.chained)
    servers = []
    if settings.readiness_port:
        servers.append(serve_readiness(settings.readiness_port, installer.readiness_problems))
    if settings.monitoring_port:
        try:
            servers.append(serve_metrics(settings.monitoring_port))
        except InstallError as err:  # as Istio: metrics are not worth failing the node for
            logs.get().error(str(err))
    controller = start_repair(settings)
    node_agent = _start_agent(settings)
    failure: list[BaseException] = []
    worker = threading.Thread(target=_capture(installer.run, failure), name="install")
    worker.start()
    try:
        _wait_for_signal(worker)
    finally:
        stop.set()
        if controller is not None:
            controller.stop()  # a repair in progress finishes; the watch ends at once
        if node_agent is not None:
            node_agent.stop()  # in-flight CNI calls finish; new ones fall back meanwhile
        worker.join()
        for server in servers:
            server.shutdown()
            server.server_close()
        _capture(installer.cleanup, failure)()
    if failure:
        raise failure[0]  # the first failure; a later cleanup failure was logged
    return 0


def _wait_for_signal(worker: threading.Thread) -> None:
    """Return on SIGTERM/SIGINT, or when the worker has ended (with an error)."""
    while worker.is_alive():
        received = signal.sigtimedwait(_SIGNALS, 0.2)
        if received is not None:
            if received.si_signo not in _SIGNALS:
                continue  # under load this CPython has returned si_signo 0 here
            name = signal.Signals(received.si_signo).name
            logs.get().info("signal received; cleaning up", signal=name)
            return


def _capture(target: Callable[[], None], failure: list[BaseException]) -> Callable[[], None]:
    def call() -> None:
        try:
            target()
        except BaseException as err:  # handed to the main thread, which re-raises the first
            if failure:
                logs.get().error(str(err))
            failure.append(err)

    return call


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """`python -m meshnet.cni.install`: options from the environment only (see ENV_OPTIONS)."""
    args = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if environ is None else environ
    if args in (["-h"], ["--help"]):
        sys.stdout.write(_usage())
        return 0
    logs.configure("json" if env.get("MESHNET_LOG_FORMAT") == "json" else "text")
    if args:
        sys.stderr.write(f"Error: unexpected arguments {args}; options are env variables\n")
        return 255
    try:
        settings = Settings.from_env(env)
        logs.configure(settings.log_format, f"default:{settings.log_level}")
        return run(settings)
    except MeshnetError as err:
        logs.get().error(str(err))
        return err.exit_code


def _usage() -> str:
    lines = ["usage: meshnet cni install  (options are environment variables)", ""]
    width = max(len(option.name) for option in ENV_OPTIONS)
    for option in ENV_OPTIONS:
        default = f" [default {option.default!r}]" if option.default else ""
        lines.append(f"  {option.name:<{width}}  {option.help}{default}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
