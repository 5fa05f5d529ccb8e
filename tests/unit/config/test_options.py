"""Option parsing: Istio's precedence (flag > alias env > env > default) and every validation."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from meshnet.config import options
from meshnet.config.options import Options
from meshnet.errors import EnvironmentFactError, OptionError
from tests.support.cli import meshnet
from tests.support.fakes import FakeSystem


def build(
    cli: Mapping[str, str | None] | None = None,
    env: Mapping[str, str] | None = None,
    system: FakeSystem | None = None,
) -> Options:
    raw = options.gather(cli or {}, env or {})
    return options.build(raw, system or FakeSystem())


def test_istio_defaults() -> None:
    o = build()
    assert (o.proxy_port, o.inbound_capture_port, o.inbound_tunnel_port) == (15001, 15006, 15008)
    assert (o.tproxy_mark, o.tproxy_route_table, o.probe_port, o.probe_timeout) == (
        1337,
        133,
        15002,
        5.0,
    )
    assert o.proxy_uids == ("1337",) and o.proxy_gids == ("1337",)
    assert o.inbound_ports.empty and o.service_cidr.v4 == () and not o.service_cidr.wildcard
    assert o.owner_groups_include.wildcard and o.ipv4_loopback_cidr == "127.0.0.1/32"
    assert not o.enable_ipv6 and o.output_format == "restore"


def test_command_line_beats_env() -> None:
    o = build({"inbound_capture_port": "7000"}, {"INBOUND_CAPTURE_PORT": "8000"})
    assert o.inbound_capture_port == 7000


def test_env_applies_when_flag_absent() -> None:
    assert build(env={"INBOUND_CAPTURE_PORT": "8000"}).inbound_capture_port == 8000


def test_envoy_port_has_no_env_binding() -> None:
    assert build(env={"ENVOY_PORT": "9999", "PROXY_PORT": "9999"}).proxy_port == 15001


@pytest.mark.parametrize(
    ("key", "primary", "alias"),
    [
        ("redirect_dns", "REDIRECT_DNS", "ISTIO_META_DNS_CAPTURE"),
        ("drop_invalid", "DROP_INVALID", "INVALID_DROP"),
        ("dual_stack", "DUAL_STACK", "ISTIO_DUAL_STACK"),
    ],
)
def test_alias_env_beats_primary_env_and_flag_beats_both(
    key: str, primary: str, alias: str
) -> None:
    env = {primary: "false", alias: "true", "MESHNET_DNS_SERVERS": ""}
    assert getattr(build(env=env), key) is True
    assert getattr(build(env={primary: "true", "MESHNET_DNS_SERVERS": ""}), key) is True
    assert getattr(build({key: "false"}, env), key) is False


def test_go_bool_spellings() -> None:
    for text in ("1", "t", "T", "TRUE", "true", "True"):
        assert build(env={"DROP_INVALID": text}).drop_invalid
    for text in ("0", "f", "F", "FALSE", "false", "False"):
        assert not build(env={"DROP_INVALID": text}).drop_invalid


def test_proxy_gid_defaults_to_uid_text() -> None:
    o = build({"proxy_uid": "3,4"})
    assert o.proxy_gids == ("3", "4")


def test_proxy_uid_looked_up_from_envoy_user() -> None:
    assert build(env={"ENVOY_USER": "envoy"}).proxy_uids == ("101",)
    assert build(env={"ENVOY_USER": "nobody-here"}).proxy_uids == ("1337",)


def test_user_and_group_names_that_resolve_are_kept_verbatim() -> None:
    o = build({"proxy_uid": "istio-proxy", "proxy_gid": "root"})
    assert o.proxy_uids == ("istio-proxy",) and o.proxy_gids == ("root",)


def test_cidrs_keep_host_bits_and_canonicalise_ipv6() -> None:
    o = build({"service_cidr": "10.1.2.3/8,2001:DB8:0:0::/32", "service_exclude_cidr": ""})
    assert o.service_cidr.v4 == ("10.1.2.3/8",) and o.service_cidr.v6 == ("2001:db8::/32",)


def test_empty_list_elements_are_dropped() -> None:
    assert build({"local_exclude_ports": "6000,7000,"}).local_exclude_ports == (6000, 7000)


def test_ipv6_detection_and_explicit_override() -> None:
    v6_only = FakeSystem(("::1", "fe80::1", "2001:db8::1"))
    assert build(system=v6_only).enable_ipv6
    dual = FakeSystem(("192.0.2.1", "2001:db8::1"))
    assert not build(system=dual).enable_ipv6
    assert build({"dual_stack": "true"}, system=dual).enable_ipv6
    assert not build({"enable_ipv6": "false"}, system=v6_only).enable_ipv6
    with pytest.raises(EnvironmentFactError, match="no valid local IP address"):
        build(system=FakeSystem(("127.0.0.1", "::1")))


def test_dns_servers_from_resolv_conf_are_canonical() -> None:
    system = FakeSystem(resolv="nameserver 127.0.0.53\nnameserver ::127.0.0.53\nnameserver x\n")
    o = build({"redirect_dns": "true", "resolv_conf": "/r"}, system=system)
    assert (o.dns_servers_v4, o.dns_servers_v6) == (("127.0.0.53",), ("::7f00:35",))
    assert system.reads == ["/r"]


def test_dns_servers_flag_is_verbatim_and_skips_resolv_conf() -> None:
    system = FakeSystem(resolv="nameserver 192.0.2.9\n")
    o = build({"redirect_dns": "true", "dns_servers": "127.0.0.53,::127.0.0.53"}, system=system)
    assert (o.dns_servers_v4, o.dns_servers_v6) == (("127.0.0.53",), ("::127.0.0.53",))
    assert system.reads == []
    assert build({"redirect_dns": "true", "dns_servers": ""}, system=system).dns_servers_v4 == ()


def test_resolv_conf_not_read_with_capture_all_dns() -> None:
    system = FakeSystem(resolv="nameserver 192.0.2.9\n")
    build({"redirect_dns": "true", "capture_all_dns": "true"}, system=system)
    assert system.reads == []


BAD_VALUES = [
    ({"envoy_port": "0"}, {}, "'0' for -p/--envoy-port"),
    ({"envoy_port": "70000"}, {}, "'70000' for -p/--envoy-port"),
    ({"inbound_ports": "80,abc"}, {}, "'80,abc' for -b/--istio-inbound-ports: 'abc'"),
    ({"inbound_ports": "80, 90"}, {}, "' 90' is not a port"),
    (
        {"service_cidr": "10.0.0.0"},
        {},
        "-i/--istio-service-cidr: '10.0.0.0' is not a CIDR: no '/'",
    ),
    ({"service_cidr": "10.0.0.0/33"}, {}, "bad prefix length"),
    ({"service_exclude_cidr": "*"}, {}, "OUTBOUND_IP_RANGES_EXCLUDE"),
    (
        {},
        {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "10.0.0.1/32"},
        "expected valid IPv4 loopback address in CIDR 10.0.0.1/32",
    ),
    ({}, {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "127.0.0.1/4"}, "mask in range [8, 32]; found 4"),
    ({}, {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "127.0.0.1"}, "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR"),
    (
        {},
        {"ISTIO_OUTBOUND_OWNER_GROUPS": ",".join(str(g) for g in range(65))},
        "cannot exceed 64, got 65",
    ),
    ({"force_iptables_binary": "iptables"}, {}, "invalid FORCE_IPTABLES_BINARY value 'iptables'"),
    ({}, {"REDIRECT_DNS": "maybe"}, "invalid value 'maybe' for env REDIRECT_DNS"),
    ({}, {"ISTIO_META_DNS_CAPTURE": "yes"}, "env ISTIO_META_DNS_CAPTURE"),
    ({"proxy_uid": "nosuchuser"}, {}, "unknown user 'nosuchuser'"),
    ({"proxy_gid": "nosuchgroup"}, {}, "unknown group 'nosuchgroup'"),
    ({"exclude_interfaces": "eth0,this-name-is-too-long"}, {}, "not a valid interface name"),
    ({"kube_virt_interfaces": "a/b"}, {}, "-k/--kube-virt-interfaces"),
    ({"tproxy_mark": "0x539"}, {}, "-t/--istio-inbound-tproxy-mark"),
    ({"tproxy_route_table": "main"}, {}, "-r/--istio-inbound-tproxy-route-table"),
    ({"probe_timeout": "5"}, {}, "Go duration"),
    ({"enable_ipv6": "sometimes"}, {}, "--enable-ipv6"),
    ({"dns_servers": "192.0.2.300"}, {}, "--dns-servers"),
    ({"output_format": "yaml"}, {}, "--output-format"),
]


@pytest.mark.parametrize(("cli", "env", "message"), BAD_VALUES)
def test_bad_value_is_named_in_one_line(
    cli: dict[str, str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(OptionError) as caught:
        build(cli, env)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_go_durations() -> None:
    assert build({"probe_timeout": "1m30s"}).probe_timeout == 90
    assert build({"probe_timeout": "500ms"}).probe_timeout == 0.5


@pytest.mark.parametrize(
    ("args", "env", "code", "stderr"),
    [
        (["-p", "0"], {}, 1, "-p/--envoy-port"),
        (["-b", "80,abc"], {}, 1, "'abc' is not a port"),
        (["-i", "10.0.0.0"], {}, 1, "no '/'"),
        (["-x", "*"], {}, 1, "OUTBOUND_IP_RANGES_EXCLUDE"),
        (["--force-iptables-binary", "bad"], {}, 1, "FORCE_IPTABLES_BINARY"),
        ([], {"REDIRECT_DNS": "maybe"}, 1, "env REDIRECT_DNS"),
        (["-u", "no-such-user-here"], {}, 1, "unknown user"),
        (["--no-such-flag"], {}, 255, "No such option"),
        (["--dry-run=maybe"], {}, 255, "-n/--dry-run"),
        (["--iptables-probe-port", "abc"], {}, 255, "--iptables-probe-port"),
        (["--probe-timeout", "5x"], {}, 255, "--probe-timeout"),
        ([], {"PROBE_TIMEOUT": "5x"}, 1, "env PROBE_TIMEOUT"),
        ([], {"IPTABLES_PROBE_PORT": "70000"}, 1, "env IPTABLES_PROBE_PORT"),
        (["-p"], {}, 255, "requires an argument"),
    ],
)
def test_cli_exit_codes(args: list[str], env: dict[str, str], code: int, stderr: str) -> None:
    result = meshnet(["istio-iptables", "-n", "--enable-ipv6", "false", *args], env=env)
    assert result.returncode == code
    assert stderr in result.stderr
    assert result.stdout == ""


def test_bool_flag_forms() -> None:
    base = ["istio-iptables", "--enable-ipv6", "false", "--output-format", "json"]
    assert meshnet([*base, "-n"]).returncode == 0
    assert meshnet([*base, "--dry-run=true"]).returncode == 0
    # Not a dry run: it must try to enter the (missing) namespace, never touch this host.
    applied = meshnet([*base, "--dry-run=false", "--network-namespace", "mnt-no-such-ns"])
    assert applied.returncode == 1 and applied.stdout == ""
    assert 'network namespace "mnt-no-such-ns" not found' in applied.stderr


def test_help_lists_every_istio_flag_with_short_letter_env_and_default() -> None:
    from meshnet.config.flags import ISTIO_FLAGS

    text = " ".join(meshnet(["istio-iptables", "--help"]).stdout.split())
    for flag in ISTIO_FLAGS:
        assert flag.long is not None and flag.long in text
        if flag.short:
            assert f"{flag.short}, {flag.long}" in text
        for env in (flag.env, flag.alias_env):
            if env:
                assert f"${env}" in text
        if flag.default:
            assert f"default '{flag.default}'" in text
    for env in ("ISTIO_OUTBOUND_OWNER_GROUPS", "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "ENVOY_USER"):
        assert env in text
