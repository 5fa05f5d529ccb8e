"""The repair controller: pods that started before the plugin was in place (cni/pkg/repair).

Such a pod runs without interception; its `istio-validation` init container finds no rules,
exits 126 and crash-loops. The controller watches the pods of this node and, for each broken
one, does exactly one of (Istio's precedence): **repair** (find the pod's network namespace
through the host's /proc and program it with the plugin's engine, once per pod UID),
**delete** (its controller recreates it, now after the plugin), or **label**
(`cni.istio.io/uninitialized=true`). Every action is logged and counted
(`istio_cni_repair_pods_repaired_total{type,result}`).

The watch is a plain list-then-watch loop: resume from the last resourceVersion (bookmarks
keep it fresh), relist on 410 Gone, back off exponentially on errors, and look at every known
pod again every resync period.
"""

from __future__ import annotations

import ipaddress
import os
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshnet import errors, logs
from meshnet.cni import metrics
from meshnet.cni.kube import agent_client
from meshnet.errors import MeshnetError
from meshnet.host import netns
from meshnet.host.system import netlink_addresses

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
MAX_ATTEMPTS = 5  # per pod UID, as Istio's queue (controllers.WithMaxAttempts(5))
MIN_WATCH_SECONDS = 1.0  # a watch that ends sooner is followed by a back-off, not a new one


@dataclass(frozen=True, slots=True)
class RepairSettings:
    """Istio's repair options (cni/pkg/cmd/root.go `repair-*`, env `REPAIR_*`)."""

    enabled: bool = True
    repair_pods: bool = True
    delete_pods: bool = False
    label_pods: bool = False
    label_key: str = "cni.istio.io/uninitialized"
    label_value: str = "true"
    node_name: str = ""
    sidecar_annotation: str = "sidecar.istio.io/status"
    init_container_name: str = "istio-validation"
    init_termination_message: str = ""
    init_exit_code: int = 126
    label_selectors: str = ""
    field_selectors: str = ""
    native_nftables: bool = False
    host_proc: Path = Path("/host/proc")
    resync_seconds: float = 300.0

    @property
    def action(self) -> str | None:
        """The one action taken on a broken pod (Istio's order), None: only detect."""
        if self.repair_pods:
            return "repair"
        if self.delete_pods:
            return "delete"
        if self.label_pods:
            return "label"
        return None

    def selectors(self) -> agent_client.Selectors:
        fields = [self.field_selectors] if self.field_selectors else []
        fields.append(f"spec.nodeName={self.node_name}")
        return agent_client.Selectors(field=",".join(fields), label=self.label_selectors)


# --- which pods are broken (pure) --------------------------------------------------------------


def is_broken(pod: Mapping[str, Any], settings: RepairSettings) -> bool:
    """Istio's matchesFilter: sidecar annotation, and an init container whose *last*
    termination matches the exit code (and message, if one is set) and that has not since
    completed."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    if settings.sidecar_annotation and settings.sidecar_annotation not in annotations:
        return False
    for status in (pod.get("status") or {}).get("initContainerStatuses") or []:
        if settings.init_container_name and status.get("name") != settings.init_container_name:
            continue
        current = (status.get("state") or {}).get("terminated")
        if current and (current.get("reason") == "Completed" or current.get("exitCode") == 0):
            continue  # it succeeded since: never broken
        last = (status.get("lastState") or {}).get("terminated")
        if last and _matches(last, settings):
            return True
    return False


def _matches(terminated: Mapping[str, Any], settings: RepairSettings) -> bool:
    message = settings.init_termination_message.strip()
    if message and message != str(terminated.get("message", "")).strip():
        return False
    code = settings.init_exit_code
    return code == 0 or terminated.get("exitCode") == code


def pod_ips(pod: Mapping[str, Any]) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    status = pod.get("status") or {}
    listed = status.get("podIPs") or []
    texts = [status.get("podIP"), *((entry or {}).get("ip") for entry in listed)]
    ips = set()
    for text in texts:
        if text:
            try:
                ips.add(ipaddress.ip_address(text))
            except ValueError:
                continue
    return ips


# --- finding a pod's network namespace ---------------------------------------------------------


def find_pod_netns(ips: set[ipaddress.IPv4Address | ipaddress.IPv6Address], proc: Path) -> str:
    """`<proc>/<pid>/ns/net` of the oldest process whose namespace holds one of `ips`.

    As Istio's getPodNetNs (cni/pkg/repair/netns_linux.go): bind mounts of pod namespaces are
    in runtime-specific places, /proc is not. The oldest process is the pause container, which
    outlives the crash-looping init container. Each namespace is entered once, not per process.
    """
    if not ips:
        raise MeshnetError("the pod has no IP yet: cannot find its network namespace")
    oldest: dict[tuple[int, int], tuple[int, int]] = {}  # namespace -> (start time, pid)
    own = os.stat("/proc/thread-self/ns/net")
    for pid in _pids(proc):
        try:
            ns = os.stat(proc / str(pid) / "ns" / "net")
            started = _start_time(proc / str(pid) / "stat")
        except (OSError, ValueError):
            continue  # the process ended, or is not ours to look at
        key = (ns.st_dev, ns.st_ino)
        if key != (own.st_dev, own.st_ino) and (started, pid) < oldest.get(key, (1 << 62, 0)):
            oldest[key] = (started, pid)
    for _started, pid in sorted(oldest.values()):
        path = str(proc / str(pid) / "ns" / "net")
        if _holds_any(path, ips):
            return path
    shown = ", ".join(sorted(str(ip) for ip in ips))
    raise MeshnetError(f"no network namespace in {proc} has the pod's address {shown}")


def _pids(proc: Path) -> list[int]:
    try:
        return sorted(int(entry) for entry in os.listdir(proc) if entry.isdigit())
    except OSError as err:
        raise MeshnetError(f"cannot list processes in {proc}: {err.strerror}") from None


def _start_time(stat: Path) -> int:
    text = stat.read_text()
    return int(text[text.rindex(")") + 2 :].split()[19])  # field 22, after "comm"


def _holds_any(path: str, ips: set[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> bool:
    try:
        with netns.entered(path):
            return any(address in ips for address in netlink_addresses())
    except (MeshnetError, OSError):
        return False  # gone meanwhile, or not enterable


# --- the controller -------------------------------------------------------------------------------


class Controller:
    """Watches this node's pods and acts on the broken ones until `stop()`."""

    def __init__(self, settings: RepairSettings, api: agent_client.PodApi) -> None:
        self.settings = settings
        self._api = api
        self._stop = threading.Event()
        self._pods: dict[tuple[str, str], dict[str, Any]] = {}
        self._repaired: dict[tuple[str, str], str] = {}  # pod -> the UID we repaired
        self._attempts: dict[str, int] = {}  # pod UID -> failed actions
        self._log = logs.get().bind(controller="repair")
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        self._log.info(
            "starting the repair controller",
            action=self.settings.action,
            node=self.settings.node_name,
            selectors=self.settings.selectors().query(),
        )
        version: str | None = None
        delay = BACKOFF_FIRST
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._relist()
                started = time.monotonic()
                version = self._watch(version)
                if time.monotonic() - started >= MIN_WATCH_SECONDS:
                    delay = BACKOFF_FIRST
                elif self._stop.wait(delay):  # a server that ends every watch at once
                    break
                else:
                    delay = min(delay * 2, BACKOFF_MAX)
            except errors.Gone as err:
                metrics.watch_error("gone")
                self._log.info("resourceVersion expired; listing again", error=str(err))
                version = None
            except errors.ApiError as err:
                metrics.watch_error("unreachable" if err.status == 0 else "api")
                self._log.warning("pod watch failed; retrying", error=str(err), retry_in=delay)
                if self._stop.wait(delay):
                    break
                delay = min(delay * 2, BACKOFF_MAX)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="repair", daemon=True)
        thread.start()
        self._thread = thread
        return thread

    def stop(self, timeout: float = 10.0) -> None:
        """End the watch now; a repair in progress finishes (up to `timeout`)."""
        self._stop.set()
        self._api.abort()
        if self._thread is not None:
            self._thread.join(timeout)

    def _relist(self) -> str:
        listed = self._api.list_pods(self.settings.selectors())
        self._pods = {_key(pod): pod for pod in listed.items}
        self._repaired = {k: v for k, v in self._repaired.items() if k in self._pods}
        uids = {str((pod.get("metadata") or {}).get("uid", "")) for pod in listed.items}
        self._attempts = {uid: n for uid, n in self._attempts.items() if uid in uids}
        self._log.info(
            "listed pods", count=len(listed.items), resource_version=listed.resource_version
        )
        for pod in list(self._pods.values()):
            self.reconcile(pod)
        return listed.resource_version

    def _watch(self, version: str) -> str:
        """Follow the watch from `version`; the server ends it after a jittered resync period
        (then every known pod is looked at again). Returns the last resourceVersion seen."""
        period = self.settings.resync_seconds
        timeout = max(1, int(period * random.uniform(1.0, 2.0)))  # as client-go's jitter
        for kind, pod in self._api.watch_pods(self.settings.selectors(), version, timeout):
            version = str((pod.get("metadata") or {}).get("resourceVersion") or version)
            if kind == "BOOKMARK":
                continue
            key = _key(pod)
            if kind == "DELETED":
                self._pods.pop(key, None)
                self._repaired.pop(key, None)  # as Istio: never leak
                self._attempts.pop(str((pod.get("metadata") or {}).get("uid", "")), None)
                continue
            self._pods[key] = pod
            self.reconcile(pod)
        if not self._stop.is_set():
            for pod in list(self._pods.values()):
                self.reconcile(pod)
        return version

    def reconcile(self, pod: Mapping[str, Any]) -> None:
        """Act on one pod if it is broken; failures are logged, counted and retried on the
        pod's next event, up to MAX_ATTEMPTS per UID."""
        action = self.settings.action
        if action is None or not is_broken(pod, self.settings):
            return
        meta = pod.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return  # on its way out: acting again would only fail its preconditions
        uid = str(meta.get("uid", ""))
        if self._attempts.get(uid, 0) >= MAX_ATTEMPTS:
            return
        log = self._log.bind(pod=f"{meta.get('namespace')}/{meta.get('name')}", uid=uid)
        try:
            result = getattr(self, f"_{action}")(pod, log)
        except Exception as err:  # one pod's failure must not end the watch for all others
            self._attempts[uid] = self._attempts.get(uid, 0) + 1
            detail = str(err) if isinstance(err, MeshnetError) else repr(err)
            log.error(f"{action} of a broken pod failed", error=detail, attempt=self._attempts[uid])
            metrics.pod_repair(action, "fail")
            return
        if result is not None:
            metrics.pod_repair(action, result)

    def _repair(self, pod: Mapping[str, Any], log: Any) -> str | None:
        key, uid = _key(pod), str(pod["metadata"].get("uid", ""))
        if key in self._repaired:
            if self._repaired[key] != uid:
                log.error("already repaired with another UID; skipping", other=self._repaired[key])
            return None  # the pod recovers only at its next restart; events until then are noise
        log.info("pod detected as broken; repairing")
        path = find_pod_netns(pod_ips(pod), self.settings.host_proc)
        from meshnet.cni.plugin import commands  # the engine: only when a pod needs it

        reason = commands.program_pod(path, dict(pod), self.settings.native_nftables)
        self._repaired[key] = uid
        if reason is not None:
            log.info("pod gets no rules; nothing to repair", reason=reason, netns=path)
            return "skip"
        log.info("pod repaired", netns=path)
        return "success"

    def _delete(self, pod: Mapping[str, Any], log: Any) -> str:
        meta = pod["metadata"]
        log.info("pod detected as broken; deleting")
        uid, version = str(meta.get("uid", "")), str(meta.get("resourceVersion", ""))
        self._api.delete_pod(meta["namespace"], meta["name"], uid, version)
        log.info("broken pod deleted")
        return "success"

    def _label(self, pod: Mapping[str, Any], log: Any) -> str:
        meta = pod["metadata"]
        key, value = self.settings.label_key, self.settings.label_value
        if key in (meta.get("labels") or {}):
            log.info("broken pod already labeled; skipping", label=key)
            return "skip"
        log.info("pod detected as broken; labeling", label=f"{key}={value}")
        patch = {"metadata": {"labels": {key: value}}}
        self._api.patch_pod_status(meta["namespace"], meta["name"], patch)
        return "success"


def _key(pod: Mapping[str, Any]) -> tuple[str, str]:
    meta = pod.get("metadata") or {}
    return str(meta.get("namespace", "")), str(meta.get("name", ""))
