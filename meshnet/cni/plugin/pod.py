"""A pod object → whether it gets rules, and the istio-iptables options it gets.

Istio maps them in NewRedirect (`cni/pkg/plugin/sidecar_redirect.go`).

Pure: the pod JSON in, a decision and option texts out, keyed like `config.flags`. Whoever may
create pods writes these values and the plugin runs as root on the node, so each value must be
text of the expected JSON type here, and `meshnet.config.options.build` then checks it like a flag,
naming the annotation or pod field (`origin_of`) when it refuses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshnet.config import flags as istio_flags
from meshnet.config.flags import DEFAULT_PROXY_ID
from meshnet.errors import OptionError

_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}
STATUS_ANNOTATION = "sidecar.istio.io/status"
INJECT = "sidecar.istio.io/inject"
ANNOTATIONS = {  # annotation -> (option key, default)
    "sidecar.istio.io/interceptionMode": ("inbound_interception_mode", "REDIRECT"),
    "traffic.sidecar.istio.io/includeOutboundIPRanges": ("service_cidr", "*"),
    "traffic.sidecar.istio.io/excludeOutboundIPRanges": ("service_exclude_cidr", ""),
    "traffic.sidecar.istio.io/includeInboundPorts": ("inbound_ports", "*"),
    "traffic.sidecar.istio.io/excludeOutboundPorts": ("outbound_ports_exclude", "15020"),
    "traffic.sidecar.istio.io/includeOutboundPorts": ("outbound_ports", ""),
    "traffic.sidecar.istio.io/excludeInterfaces": ("exclude_interfaces", ""),
}
EXCLUDE_INBOUND = "traffic.sidecar.istio.io/excludeInboundPorts"
REROUTE = ("istio.io/reroute-virtual-interfaces", "traffic.sidecar.istio.io/kubevirtInterfaces")
ALWAYS_EXCLUDED_INBOUND = ("15020", "15021", "15090")
RUN_AS = {  # option key -> the pod field it comes from
    "proxy_uid": "spec.containers[istio-proxy].securityContext.runAsUser",
    "proxy_gid": "spec.containers[istio-proxy].securityContext.runAsGroup",
}
_MAX_ID = 2**31 - 1  # Kubernetes validates runAsUser/runAsGroup to 0..2147483647


@dataclass(frozen=True, slots=True)
class PodDecision:
    skip_reason: str | None  # why the pod gets no rules; None: it gets `flags`
    flags: dict[str, str]


def decide(pod: Mapping[str, Any]) -> PodDecision:
    """Istio's skip rules in order, then the annotation mapping."""
    meta = pod.get("metadata") or {}
    annotations: dict[str, str] = meta.get("annotations") or {}
    labels: dict[str, str] = meta.get("labels") or {}
    spec = pod.get("spec") or {}
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    proxy = next((c for c in containers if c.get("name") == "istio-proxy"), None)
    proxy_env = _env(proxy)
    reason = _skip_reason(containers, proxy, proxy_env, labels, annotations)
    if reason is not None:
        return PodDecision(reason, {})
    return PodDecision(None, _flags(annotations, proxy or {}, proxy_env))


def _skip_reason(
    containers: list[dict[str, Any]],
    proxy: dict[str, Any] | None,
    env: dict[str, str],
    labels: dict[str, str],
    annotations: dict[str, str],
) -> str | None:
    if any(c.get("name") == "istio-init" for c in containers):
        return "pod has an istio-init container (rules are set up by it)"
    if env.get("DISABLE_ENVOY", "") in _TRUE:
        return "istio-proxy has DISABLE_ENVOY=true"
    if proxy is None:
        return "pod has no istio-proxy container"
    args = proxy.get("args") or []
    if len(args) >= 2 and args[0] == "proxy" and args[1] != "sidecar":
        return f"istio-proxy is a {args[1]}, not a sidecar"
    inject = labels.get(INJECT, annotations.get(INJECT))
    if inject in _FALSE:
        return f"{INJECT} is false"
    if STATUS_ANNOTATION not in annotations:
        return f"pod has no {STATUS_ANNOTATION} annotation"
    return None


def _env(container: Mapping[str, Any] | None) -> dict[str, str]:
    if container is None:
        return {}
    return {e["name"]: str(e.get("value", "")) for e in container.get("env") or [] if "name" in e}


def _flags(
    annotations: dict[str, str], proxy: Mapping[str, Any], env: dict[str, str]
) -> dict[str, str]:
    fixed = ("envoy_port", "inbound_capture_port", "inbound_tunnel_port", "tproxy_mark")
    flags = {key: istio_flags.default(key) for key in (*fixed, "tproxy_route_table")}
    flags["cni_mode"] = "true"
    for annotation, (key, default) in ANNOTATIONS.items():
        flags[key] = _trimmed_list(_text(annotations, annotation, default), key)
    mode = flags["inbound_interception_mode"]
    if mode not in ("REDIRECT", "TPROXY"):
        raise _invalid("sidecar.istio.io/interceptionMode", mode, "expected REDIRECT or TPROXY")
    flags["local_exclude_ports"] = _exclude_inbound(_text(annotations, EXCLUDE_INBOUND, ""))
    reroute_key = REROUTE[0] if REROUTE[0] in annotations else REROUTE[1]
    reroute = _text(annotations, reroute_key, "")
    flags["kube_virt_interfaces"] = ",".join(p.strip() for p in reroute.split(",") if p.strip())
    security = proxy.get("securityContext") or {}
    flags["proxy_uid"] = _run_as(security, "runAsUser", "proxy_uid")  # 0 or absent: 1337
    flags["proxy_gid"] = _run_as(security, "runAsGroup", "proxy_gid")
    dns = _env_bool(env, "ISTIO_META_DNS_CAPTURE")
    flags["redirect_dns"] = flags["capture_all_dns"] = dns  # CNI always captures all DNS
    flags["dual_stack"] = _env_bool(env, "ISTIO_DUAL_STACK")
    flags["drop_invalid"] = _env_bool(env, "INVALID_DROP")
    return flags


def _text(annotations: Mapping[str, Any], annotation: str, default: str) -> str:
    """An annotation's value; the API server only stores strings, a stub might not."""
    value = annotations.get(annotation, default)
    if not isinstance(value, str):
        raise _invalid(annotation, repr(value), "expected a string")
    return value


def _run_as(security: Mapping[str, Any], field: str, key: str) -> str:
    value = security.get(field)
    if value is None or value == 0:
        return DEFAULT_PROXY_ID  # Istio: 0 or absent means the proxy's default UID/GID
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_ID:
        raise OptionError(
            f"invalid value {value!r} for pod field {RUN_AS[key]}: "
            f"expected an integer from 0 to {_MAX_ID}"
        )
    return str(value)


def _trimmed_list(value: str, key: str) -> str:
    if key in ("service_cidr", "service_exclude_cidr", "inbound_interception_mode"):
        return value  # Istio does not trim CIDR lists
    return ",".join(part.strip() for part in value.split(",") if part.strip())


def _exclude_inbound(value: str | None) -> str:
    """Istio's post-processing: the proxy's own ports are always excluded, first come first."""
    text = (value or "").strip()
    if text == "*" or "*" in text.split(","):
        raise _invalid(EXCLUDE_INBOUND, text, "'*' cannot be excluded (it would exclude all)")
    ports = [p.strip() for p in text.split(",") if p.strip()] + list(ALWAYS_EXCLUDED_INBOUND)
    return ",".join(dict.fromkeys(ports))


def _env_bool(env: dict[str, str], name: str) -> str:
    # Istio: a parse error only warns and leaves the option off.
    return "true" if env.get(name, "") in _TRUE else "false"


def _invalid(annotation: str, value: str, problem: str) -> OptionError:
    return OptionError(f"annotation value error for value {value!r} of {annotation}: {problem}")


def origin_of(key: str) -> str:
    """How an error names where an option set from a pod came from."""
    if key in RUN_AS:
        return f"pod field {RUN_AS[key]}"
    return f"annotation {annotation_of(key)}"


def annotation_of(key: str) -> str:
    """The annotation that sets an option key, for error messages."""
    for annotation, (option, _default) in ANNOTATIONS.items():
        if option == key:
            return annotation
    if key == "local_exclude_ports":
        return EXCLUDE_INBOUND
    if key == "kube_virt_interfaces":
        return REROUTE[0]
    return key
