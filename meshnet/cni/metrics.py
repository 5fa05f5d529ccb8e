"""Prometheus metrics of the resident node process, served on MONITORING_PORT at `/metrics`.

Istio's names and labels where Istio has the metric (cni/pkg/install/monitoring.go,
cni/pkg/repair/monitoring.go); `meshnet_cni_*` for meshnet's own. `prometheus_client` is
imported only here, and only the resident process (`meshnet cni install`, the node agent)
imports this module: the per-pod plugin never pays for it.

The functions below are the interface: the installer, the repair controller and the node agent
call them; they are cheap and thread-safe.
"""

from __future__ import annotations

from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import generate_latest

# Istio's exporter has no `*_created` series; without them the output is Istio's names only.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)
# The classic text format, as Go's promhttp serves Istio's (every Prometheus reads it).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Istio's install results (cni/pkg/install/monitoring.go).
INSTALL_SUCCESS = "SUCCESS"
INSTALL_COPY_BINARIES_FAILURE = "COPY_BINARIES_FAILURE"
INSTALL_CREATE_KUBECONFIG_FAILURE = "CREATE_KUBECONFIG_FAILURE"
INSTALL_CREATE_CNI_CONFIG_FAILURE = "CREATE_CNI_CONFIG_FAILURE"

# Istio's repair labels (cni/pkg/repair/monitoring.go).
REPAIR_TYPES = ("repair", "delete", "label")
REPAIR_RESULTS = ("success", "skip", "fail")

# A CNI request is a few tenths of a second; the kubelet gives up after minutes.
_CNI_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# prometheus_client appends `_total` to a counter's name, giving Istio's exact names.
_installs = Counter(
    "istio_cni_installs",
    "Total number of CNI plugins installed by the Istio CNI installer",
    ["result"],
    registry=REGISTRY,
)
_install_ready = Gauge(
    "istio_cni_install_ready",
    "Whether the CNI plugin installation is ready or not",
    registry=REGISTRY,
)
_repaired = Counter(
    "istio_cni_repair_pods_repaired",
    "Total number of pods repaired by repair controller",
    ["type", "result"],
    registry=REGISTRY,
)
_watch_errors = Counter(
    "meshnet_cni_repair_watch_errors",
    "Failed pod list or watch calls of the repair controller (each is retried after a back-off)",
    ["reason"],
    registry=REGISTRY,
)
_cni_requests = Histogram(
    "meshnet_cni_request_duration_seconds",
    "CNI requests handled by the node agent, by command and result, and how long they took",
    ["command", "result"],
    buckets=_CNI_BUCKETS,
    registry=REGISTRY,
)
_fallbacks = Counter(
    "meshnet_cni_fallback",
    "CNI requests the plugin handled itself because the node agent did not answer",
    registry=REGISTRY,
)
_queue_depth = Gauge(
    "meshnet_cni_agent_queue_depth",
    "CNI requests waiting in the node agent",
    registry=REGISTRY,
)


def install_result(result: str) -> None:
    """One install outcome: INSTALL_SUCCESS or one of Istio's failure results."""
    _installs.labels(result=result).inc()


def set_install_ready(ready: bool) -> None:
    _install_ready.set(1 if ready else 0)


def pod_repair(kind: str, result: str) -> None:
    """One repair-controller action: kind in REPAIR_TYPES, result in REPAIR_RESULTS."""
    if kind not in REPAIR_TYPES or result not in REPAIR_RESULTS:
        raise ValueError(f"unknown repair metric labels type={kind!r} result={result!r}")
    _repaired.labels(type=kind, result=result).inc()


def watch_error(reason: str) -> None:
    """A failed list/watch call: reason `gone` (410, relisted), `api` or `unreachable`."""
    _watch_errors.labels(reason=reason).inc()


def observe_cni_request(command: str, result: str, seconds: float) -> None:
    """A CNI request the agent finished: command ADD/DEL/CHECK/..., result `ok` or an error
    code's name, and its duration."""
    _cni_requests.labels(command=command, result=result).observe(seconds)


class FinishedCall(Protocol):
    """What the node agent knows of a served call (its request hooks get one)."""

    # read-only: the agent's record is a frozen dataclass
    @property
    def command(self) -> str: ...
    @property
    def exit_code(self) -> int: ...
    @property
    def seconds(self) -> float: ...
    @property
    def queue_depth(self) -> int: ...
    @property
    def timed_out(self) -> bool: ...


def record_call(call: FinishedCall) -> None:
    """A node-agent request hook: the call's duration by command and result, and the queue."""
    result = "timeout" if call.timed_out else ("ok" if call.exit_code == 0 else "error")
    observe_cni_request(call.command, result, call.seconds)
    set_queue_depth(call.queue_depth)


def fallback_used() -> None:
    _fallbacks.inc()


def set_queue_depth(depth: int) -> None:
    _queue_depth.set(depth)


def exposition() -> tuple[bytes, str]:
    """The `/metrics` body and its content type (Prometheus text format 0.0.4)."""
    return generate_latest(REGISTRY), CONTENT_TYPE
