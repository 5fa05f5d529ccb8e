"""The `Installer`: Istio's `Installer.Run` loop (`cni/pkg/install/install.go`): install, watch
the files, reinstall on a change, answer readiness from the files, clean up at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from meshnet import logs
from meshnet.cni import metrics
from meshnet.cni.install.config import (
    config_problem,
    create_cni_config_file,
    preempted_by,
    remove_cni_config,
)
from meshnet.cni.install.files import install_binary, write_kubeconfig
from meshnet.cni.install.settings import AGENT_SOCKET_NAME, Settings
from meshnet.errors import InstallCancelled, InstallError, MeshnetError

THROTTLE_RATE = 0.2  # Istio: installs per second before the loop counts as "rapid" (burst 1)
THROTTLE_MAX_SLEEP = 1.0
THROTTLE_WARN_HITS = 5


class _Throttle:
    """Go's `rate.NewLimiter(0.2, 1)`, used as Istio does: to detect a reinstall loop."""

    def __init__(self) -> None:
        self._tokens = 1.0
        self._last: float | None = None
        self.hits = 0

    def reserve(self, now: float) -> float:
        """Take a token; return how long until it would really be available."""
        if self._last is not None:
            self._tokens = min(1.0, self._tokens + (now - self._last) * THROTTLE_RATE)
        self._last = now
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens / THROTTLE_RATE


class Installer:
    """Installs the plugin, keeps it installed until `stop` is set, and removes it."""

    def __init__(self, settings: Settings, stop: threading.Event) -> None:
        self.settings = settings
        self.config_path: Path | None = None
        self._stop = stop
        self._ready = threading.Event()
        self._binaries: list[Path] = []
        self._kubeconfig: Path | None = None
        self._log = logs.get().bind(plugin=settings.plugin_name)

    def run(self) -> None:
        """Istio's `Installer.Run`: install, then reinstall whenever a watched file changes."""
        try:
            self.install_all()
            self._log.info("initial installation complete; watching for changes")
            throttle = _Throttle()
            while not self._stop.is_set():
                self._throttle(throttle)
                if not self._sleep_watch_install():
                    return
                self._log.info("detected changes to the node's CNI setup; checking")
                self.install_all()
        except InstallCancelled:
            return

    def install_all(self) -> None:
        """Binaries, kubeconfig, then the CNI config only when it is not valid already.
        A failure is counted with Istio's result for its step (istio_cni_installs_total)."""
        with _counted(metrics.INSTALL_COPY_BINARIES_FAILURE):
            for bin_dir in self.settings.bin_dirs:
                plugin, name = self.settings.plugin_binary, self.settings.plugin_name
                target = install_binary(plugin, bin_dir, name)
                if target not in self._binaries:
                    self._binaries.append(target)
        with _counted(metrics.INSTALL_CREATE_KUBECONFIG_FAILURE):
            self._kubeconfig = write_kubeconfig(self.settings)
        problem = config_problem(self.settings, self.config_path)
        if problem is None:
            self._warn_if_preempted()
            self._log.info("valid CNI config present; not modifying", path=str(self.config_path))
            return
        self._log.info("CNI config needs (re)writing", reason=problem)
        with _counted(metrics.INSTALL_CREATE_CNI_CONFIG_FAILURE):
            self.config_path = create_cni_config_file(self.settings, self._wait)
        self._log.info("wrote CNI config", path=str(self.config_path))

    def is_ready(self) -> bool:
        """Readiness: installed, watching, and the config on disk still valid right now."""
        return not self.readiness_problems()

    def readiness_problems(self) -> list[str]:
        """What keeps the node from being ready, checked on the files now; empty: ready."""
        settings = self.settings
        problems = [
            f"plugin binary missing: {bin_dir / settings.plugin_name}"
            for bin_dir in settings.bin_dirs
            if not os.path.exists(bin_dir / settings.plugin_name)  # follows the onedir link
        ]
        if not settings.kubeconfig_path.is_file():
            problems.append(f"kubeconfig missing: {settings.kubeconfig_path}")
        config = config_problem(settings, self.config_path)
        if config is not None:
            problems.append(config)
        if settings.agent_socket_check or settings.agent:
            agent = agent_socket_problem(settings.run_dir / AGENT_SOCKET_NAME)
            if agent is not None:
                problems.append(agent)
        if not problems and not self._ready.is_set():
            problems.append("installation in progress")
        return problems

    def cleanup(self) -> None:
        """Remove our plugin entry (or file), the kubeconfig and the binaries we installed."""
        failures: list[str] = []
        steps = (self._remove_config, self._remove_kubeconfig, self._remove_binaries)
        for step in steps:
            try:
                step()
            except (MeshnetError, OSError) as err:  # try every step, then report them all
                failures.append(str(err))
        if failures:
            raise InstallError("cleanup incomplete: " + "; ".join(failures))
        self._log.info("cleanup complete")

    def _remove_config(self) -> None:
        if self.config_path is not None and self.config_path.exists():
            self._log.info("removing our CNI config", path=str(self.config_path))
            remove_cni_config(self.settings, self.config_path)

    def _remove_kubeconfig(self) -> None:
        if self._kubeconfig is not None:
            self._kubeconfig.unlink(missing_ok=True)

    def _remove_binaries(self) -> None:
        for binary in self._binaries:
            self._log.info("removing binary", path=str(binary))
            binary.unlink(missing_ok=True)
            shutil.rmtree(binary.parent / f"{binary.name}.d", ignore_errors=True)  # onedir

    def _wait(self, seconds: float) -> bool:
        return not self._stop.wait(seconds)

    def _warn_if_preempted(self) -> None:
        primary = preempted_by(self.settings, self.config_path) if self.config_path else None
        if primary is not None:
            self._log.warning(
                "CNI config file preempted", path=str(self.config_path), by=str(primary)
            )

    def _throttle(self, throttle: _Throttle) -> None:
        delay = throttle.reserve(time.monotonic())
        if delay == 0:
            throttle.hits = 0  # no install in the last 5 s
            return
        self._stop.wait(min(delay, THROTTLE_MAX_SLEEP))
        throttle.hits += 1
        if throttle.hits > THROTTLE_WARN_HITS:
            hint = ""
            if "cilium" in str(self.config_path):
                hint = " Hint: Cilium CNI was detected; ensure 'cni.exclusive=false' in its config."
            self._log.warning(
                "Configuration has been reconciled multiple times in a short period of time. "
                f"This may be due to a conflicting component constantly reverting our work.{hint}"
            )

    def _sleep_watch_install(self) -> bool:
        """Ready until a watched file changes (True: check again) or stop is set (False)."""
        before = self._snapshot()  # taken first, so a change during the check is not missed
        try:
            if config_problem(self.settings, self.config_path) is not None:
                return True
            self._ready.set()
            metrics.set_install_ready(True)
            metrics.install_result(metrics.INSTALL_SUCCESS)  # as Istio: once per valid install
            while not self._stop.wait(self.settings.poll_interval):
                if self._snapshot() != before:
                    return True
            return False
        finally:
            self._ready.clear()
            metrics.set_install_ready(False)

    def _snapshot(self) -> tuple[object, ...]:
        """What Istio's fsnotify watcher watches: conf dir, our binaries, the service account."""
        settings = self.settings
        binaries = tuple(_stat_key(bin_dir / settings.plugin_name) for bin_dir in settings.bin_dirs)
        token = _read_or_none(settings.service_account_dir / "token")
        return (
            _dir_key(settings.conf_dir),
            binaries,
            _dir_key(settings.service_account_dir),
            token,
        )


@contextlib.contextmanager
def _counted(failure: str) -> Iterator[None]:
    try:
        yield
    except MeshnetError:
        metrics.install_result(failure)
        raise


def _stat_key(path: Path | os.DirEntry[str]) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: a rotated `..data` link changes the target
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode)


def _dir_key(directory: Path) -> tuple[object, ...]:
    try:
        with os.scandir(directory) as entries:
            return tuple(sorted((entry.name, _stat_key(entry)) for entry in entries))
    except OSError:
        return ("unreadable",)


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def agent_socket_problem(path: Path) -> str | None:
    """None when the node agent's Unix socket accepts a connection, else why not."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError as err:
            return f"node agent socket {path} does not answer: {err.strerror or err}"
    return None
