"""The CNI plugin's pod decisions (Istio's NewRedirect), without root: which pods are skipped and
why, the options each annotation and pod field sets, and the values that are refused."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from meshnet.cni.plugin.pod import PodDecision, decide, origin_of
from meshnet.config import options
from meshnet.config.options import Options
from meshnet.errors import OptionError
from tests.support.fakes import FakeSystem

STATUS = {"sidecar.istio.io/status": "{}"}
T = "traffic.sidecar.istio.io/"
HAS_INIT = "pod has an istio-init container (rules are set up by it)"
INJECT_FALSE = {"sidecar.istio.io/inject": "false"}


def _pod(
    annotations: Mapping[str, Any] | None = None,
    labels: Mapping[str, str] | None = None,
    proxy: dict[str, Any] | None = None,
    init: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A sidecar-injected pod; `proxy` replaces fields of its istio-proxy container."""
    sidecar = {"name": "istio-proxy", "args": ["proxy", "sidecar"], **(proxy or {})}
    return {
        "metadata": {"annotations": {**STATUS, **(annotations or {})}, "labels": labels or {}},
        "spec": {"initContainers": init or [], "containers": [{"name": "app"}, sidecar]},
    }


def _env(**values: str) -> dict[str, Any]:
    return {"env": [{"name": name, "value": value} for name, value in values.items()]}


def _options(decision: PodDecision) -> Options:
    """The options the plugin builds from a decision (commands._options, on a FakeSystem)."""
    raw = options.gather({}, {})
    for key, text in decision.flags.items():
        raw[key] = options.Raw(text, origin_of(key), explicit=True)
    return options.build(raw, FakeSystem())


DEFAULT_FLAGS = {
    "envoy_port": "15001",
    "inbound_capture_port": "15006",
    "inbound_tunnel_port": "15008",
    "tproxy_mark": "1337",
    "tproxy_route_table": "133",
    "cni_mode": "true",
    "inbound_interception_mode": "REDIRECT",
    "service_cidr": "*",
    "service_exclude_cidr": "",
    "inbound_ports": "*",
    "outbound_ports_exclude": "15020",
    "outbound_ports": "",
    "exclude_interfaces": "",
    "local_exclude_ports": "15020,15021,15090",
    "kube_virt_interfaces": "",
    "proxy_uid": "1337",
    "proxy_gid": "1337",
    "redirect_dns": "false",
    "capture_all_dns": "false",
    "dual_stack": "false",
    "drop_invalid": "false",
}


def _flags(pod: dict[str, Any]) -> dict[str, str]:
    decision = decide(pod)
    assert decision.skip_reason is None
    return decision.flags


# --- which pods get rules ------------------------------------------------------------------

NO_PROXY = {"metadata": {"annotations": STATUS}, "spec": {"containers": [{"name": "app"}]}}


@pytest.mark.parametrize(
    ("pod", "reason"),
    [
        (_pod(init=[{"name": "istio-init"}]), HAS_INIT),
        (_pod(proxy=_env(DISABLE_ENVOY="true")), "istio-proxy has DISABLE_ENVOY=true"),
        (_pod(proxy=_env(DISABLE_ENVOY="1")), "istio-proxy has DISABLE_ENVOY=true"),
        (NO_PROXY, "pod has no istio-proxy container"),
        ({}, "pod has no istio-proxy container"),
        (_pod(proxy={"args": ["proxy", "router"]}), "istio-proxy is a router, not a sidecar"),
        (_pod(labels=INJECT_FALSE), "sidecar.istio.io/inject is false"),
        (_pod({"sidecar.istio.io/inject": "F"}), "sidecar.istio.io/inject is false"),
        ({**_pod(), "metadata": {}}, "pod has no sidecar.istio.io/status annotation"),
        # Istio's order: the first reason that applies is the one given.
        ({**NO_PROXY, "spec": {"containers": [{"name": "istio-init"}]}}, HAS_INIT),
        ({"spec": {"containers": [{"name": "app"}]}}, "pod has no istio-proxy container"),
        (
            {**_pod(), "metadata": {"labels": {"sidecar.istio.io/inject": "false"}}},
            "sidecar.istio.io/inject is false",
        ),
    ],
)
def test_skip_reason(pod: dict[str, Any], reason: str) -> None:
    assert decide(pod) == PodDecision(reason, {})


@pytest.mark.parametrize(
    "pod",
    [
        _pod(),
        _pod(proxy=_env(DISABLE_ENVOY="yes")),  # not a Go bool: not disabled
        _pod(proxy={"args": ["proxy"]}),
        _pod(proxy={"args": ["pilot-agent", "router"]}),
        _pod({"sidecar.istio.io/inject": "no"}),
        # The label wins over the annotation.
        _pod({"sidecar.istio.io/inject": "false"}, labels={"sidecar.istio.io/inject": "true"}),
        # A native sidecar: istio-proxy among the init containers.
        {
            "metadata": {"annotations": STATUS},
            "spec": {"initContainers": [{"name": "istio-proxy", "restartPolicy": "Always"}]},
        },
    ],
)
def test_pods_that_get_the_default_rules(pod: dict[str, Any]) -> None:
    assert decide(pod) == PodDecision(None, DEFAULT_FLAGS)


# --- what each annotation and pod field sets ----------------------------------------------


@pytest.mark.parametrize(
    ("annotation", "value", "changed"),
    [
        ("sidecar.istio.io/interceptionMode", "TPROXY", {"inbound_interception_mode": "TPROXY"}),
        (
            T + "includeOutboundIPRanges",
            "10.0.0.0/8, 10.1.0.0/16",
            {"service_cidr": "10.0.0.0/8, 10.1.0.0/16"},
        ),
        (T + "excludeOutboundIPRanges", " 192.0.2.0/24", {"service_exclude_cidr": " 192.0.2.0/24"}),
        (T + "includeInboundPorts", " 80, 443 ,", {"inbound_ports": "80,443"}),
        (T + "excludeOutboundPorts", "", {"outbound_ports_exclude": ""}),
        (T + "includeOutboundPorts", "443,,8443", {"outbound_ports": "443,8443"}),
        (T + "excludeInterfaces", "eth1, net1", {"exclude_interfaces": "eth1,net1"}),
        # The proxy's own ports are always added, after the pod's, without repeats.
        (
            T + "excludeInboundPorts",
            " 15021 , 80,,",
            {"local_exclude_ports": "15021,80,15020,15090"},
        ),
        (
            "istio.io/reroute-virtual-interfaces",
            "veth0, veth1",
            {"kube_virt_interfaces": "veth0,veth1"},
        ),
        (T + "kubevirtInterfaces", "net1", {"kube_virt_interfaces": "net1"}),
    ],
)
def test_annotation_sets_one_option(annotation: str, value: str, changed: dict[str, str]) -> None:
    assert _flags(_pod({annotation: value})) == {**DEFAULT_FLAGS, **changed}


def test_reroute_annotation_wins_over_kubevirt_interfaces() -> None:
    pod = _pod(
        {
            "istio.io/reroute-virtual-interfaces": "",
            "traffic.sidecar.istio.io/kubevirtInterfaces": "net1",
        }
    )
    assert _flags(pod)["kube_virt_interfaces"] == ""


@pytest.mark.parametrize(
    ("security", "uid", "gid"),
    [
        ({}, "1337", "1337"),
        ({"runAsUser": 0, "runAsGroup": 0}, "1337", "1337"),  # Istio: 0 means the default
        ({"runAsUser": 1000}, "1000", "1337"),
        ({"runAsUser": 1000, "runAsGroup": 2000}, "1000", "2000"),
        ({"runAsUser": 2**31 - 1}, "2147483647", "1337"),
    ],
)
def test_run_as_sets_proxy_uid_and_gid(security: dict[str, int], uid: str, gid: str) -> None:
    flags = _flags(_pod(proxy={"securityContext": security}))
    assert (flags["proxy_uid"], flags["proxy_gid"]) == (uid, gid)


@pytest.mark.parametrize(
    ("env", "changed"),
    [
        (_env(ISTIO_META_DNS_CAPTURE="true"), {"redirect_dns": "true", "capture_all_dns": "true"}),
        (_env(ISTIO_DUAL_STACK="1"), {"dual_stack": "true"}),
        (_env(INVALID_DROP="T"), {"drop_invalid": "true"}),
        # Istio only warns about a value that is not a Go bool and leaves the option off.
        (_env(ISTIO_META_DNS_CAPTURE="yes", INVALID_DROP="on"), {}),
    ],
)
def test_proxy_env_sets_dns_dual_stack_and_drop(
    env: dict[str, Any], changed: dict[str, str]
) -> None:
    assert _flags(_pod(proxy=env)) == {**DEFAULT_FLAGS, **changed}


def test_default_decision_builds_istios_sidecar_options() -> None:
    o = _options(decide(_pod()))
    assert (o.proxy_port, o.inbound_capture_port, o.inbound_tunnel_port) == (15001, 15006, 15008)
    assert o.local_exclude_ports == (15020, 15021, 15090)
    assert o.outbound_ports_exclude == (15020,)
    assert (o.proxy_uids, o.proxy_gids, o.cni_mode) == (("1337",), ("1337",), True)


def test_origin_names_the_annotation_or_pod_field() -> None:
    assert (
        origin_of("service_cidr") == "annotation traffic.sidecar.istio.io/includeOutboundIPRanges"
    )
    assert (
        origin_of("local_exclude_ports")
        == "annotation traffic.sidecar.istio.io/excludeInboundPorts"
    )
    assert origin_of("kube_virt_interfaces") == "annotation istio.io/reroute-virtual-interfaces"
    assert (
        origin_of("proxy_gid")
        == "pod field spec.containers[istio-proxy].securityContext.runAsGroup"
    )


# --- refused values ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pod", "message"),
    [
        (_pod({"sidecar.istio.io/interceptionMode": "NONE"}),
         "annotation value error for value 'NONE' of sidecar.istio.io/interceptionMode: "
         "expected REDIRECT or TPROXY"),
        (_pod({"sidecar.istio.io/interceptionMode": "redirect"}),
         "annotation value error for value 'redirect' of sidecar.istio.io/interceptionMode: "
         "expected REDIRECT or TPROXY"),
        (_pod({"traffic.sidecar.istio.io/excludeInboundPorts": " 80,* "}),
         "annotation value error for value '80,*' of traffic.sidecar.istio.io/excludeInboundPorts: "
         "'*' cannot be excluded (it would exclude all)"),
        (_pod({"traffic.sidecar.istio.io/excludeInterfaces": ["eth0"]}),
         "annotation value error for value \"['eth0']\" of "
         "traffic.sidecar.istio.io/excludeInterfaces: expected a string"),
        (_pod({"istio.io/reroute-virtual-interfaces": 7}),
         "annotation value error for value '7' of istio.io/reroute-virtual-interfaces: "
         "expected a string"),
        (_pod(proxy={"securityContext": {"runAsUser": -1}}),
         "invalid value -1 for pod field spec.containers[istio-proxy].securityContext.runAsUser: "
         "expected an integer from 0 to 2147483647"),
        (_pod(proxy={"securityContext": {"runAsUser": 2**31}}),
         "invalid value 2147483648 for pod field "
         "spec.containers[istio-proxy].securityContext.runAsUser: "
         "expected an integer from 0 to 2147483647"),
        (_pod(proxy={"securityContext": {"runAsGroup": "1000"}}),
         "invalid value '1000' for pod field "
         "spec.containers[istio-proxy].securityContext.runAsGroup: "
         "expected an integer from 0 to 2147483647"),
        (_pod(proxy={"securityContext": {"runAsGroup": True}}),
         "invalid value True for pod field "
         "spec.containers[istio-proxy].securityContext.runAsGroup: "
         "expected an integer from 0 to 2147483647"),
    ],
)  # fmt: skip
def test_decide_refuses(pod: dict[str, Any], message: str) -> None:
    with pytest.raises(OptionError) as caught:
        decide(pod)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("annotation", "value", "message"),
    [
        ("traffic.sidecar.istio.io/includeInboundPorts", "80;reboot",
         "invalid value '80;reboot' for annotation traffic.sidecar.istio.io/includeInboundPorts: "
         "'80;reboot' is not a port (expected 1-65535)"),
        # CIDR lists are not trimmed (as in Istio), so a space is refused, not dropped.
        ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "10.0.0.0/8, 10.1.0.0/16",
         "invalid value '10.0.0.0/8, 10.1.0.0/16' for annotation "
         "traffic.sidecar.istio.io/excludeOutboundIPRanges: ' 10.1.0.0/16' is not a CIDR: "
         "' 10.1.0.0' is not an IP address"),
        # A '*' that is not the whole element passes decide and is refused as a port.
        ("traffic.sidecar.istio.io/excludeInboundPorts", "80, *",
         "invalid value '80,*,15020,15021,15090' for annotation "
         "traffic.sidecar.istio.io/excludeInboundPorts: '*' is not a port (expected 1-65535)"),
    ],
)  # fmt: skip
def test_options_refuse_naming_the_annotation(annotation: str, value: str, message: str) -> None:
    decision = decide(_pod({annotation: value}))
    with pytest.raises(OptionError) as caught:
        _options(decision)
    assert str(caught.value) == message
