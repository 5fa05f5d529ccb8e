"""explain: probe syntax, verdicts on the standard plan, and iptables/nft plans agreeing."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnet import explain
from meshnet.config import options
from meshnet.errors import OptionError
from meshnet.explain import conditions, probe
from meshnet.plan import iptables, ir, nftables
from tests.support.cli import STANDARD_FLAGS, meshnet
from tests.support.fakes import FakeSystem
from tests.support.strategies import bools, env_values, flag_values

STANDARD = {**STANDARD_FLAGS, "enable_ipv6": "true"}


def _both(flags: dict[str, str], spec: str) -> tuple[explain.Verdict, explain.Verdict]:
    opts = options.build(options.gather(flags, {}), FakeSystem())
    parsed = probe.parse(spec)
    return (
        explain.explain_iptables(iptables.ruleset(opts), parsed).verdict,
        explain.explain_nft(nftables.ruleset(opts), parsed).verdict,
    )


@pytest.mark.parametrize(
    ("spec", "kind", "port"),
    [
        ("out tcp uid=1000 dst=10.1.2.3:80", "redirect", 15001),
        ("out tcp uid=1337 dst=10.1.2.3:80", "none", None),
        ("out tcp uid=1000 gid=1337 dst=10.1.2.3:80", "none", None),
        ("in tcp src=198.51.100.2:4000 dst=192.0.2.1:8080", "redirect", 15006),
        ("in tcp dst=192.0.2.1:15021", "none", None),
        ("in tcp dst=192.0.2.1:15008", "none", None),
        ("out tcp uid=1000 dst=127.0.0.1:8080", "none", None),
        ("out tcp uid=1337 dst=192.0.2.1:8080 local=192.0.2.1", "redirect", 15006),
        ("out udp uid=1000 dst=10.1.2.3:53", "none", None),
        ("out tcp uid=1000 dst=[2001:db8::2]:80", "redirect", 15001),
        ("in tcp dst=[2001:db8::1]:8080", "redirect", 15006),
        ("out tcp uid=1000 dst=[::1]:8080", "none", None),
        ("in tcp dst=192.0.2.1:8080 state=established", "none", None),
    ],
)
def test_standard_plan_verdicts(spec: str, kind: str, port: int | None) -> None:
    ipt, nft = _both(STANDARD, spec)
    assert (ipt.kind, ipt.port) == (kind, port)
    assert (nft.kind, nft.port) == (kind, port)


def test_proxy_to_ipv6_loopback_is_not_captured_on_the_nft_plan() -> None:
    """issue 17: `ip daddr != 127.0.0.1/32` carries `meta nfproto ipv4`, so ::1 passes it by."""
    spec = "out tcp dst=[::1]:8080 uid=1337 gid=1337 local=192.0.2.2,2001:db8::2"
    for verdict in _both({**STANDARD, "dual_stack": "true"}, spec):
        assert verdict.kind == "none"


@pytest.mark.parametrize(
    ("match", "spec", "matches"),
    [
        (ir.dst("127.0.0.1/32", negated=True), "out tcp dst=[2001:db8::2]:80", False),
        (ir.dst("127.0.0.1/32", negated=True), "out tcp dst=192.0.2.2:80", True),
        (ir.dst("::1/128", negated=True), "out tcp dst=192.0.2.2:80", False),
        (ir.dst_set("v4"), "out tcp dst=[2001:db8::2]:80", False),
        (ir.dst_set("v4"), "out tcp dst=192.0.2.2:80", True),
        (ir.dport("tcp", "53", negated=True), "out udp dst=192.0.2.2:80", False),
        (ir.dport("udp", "53", "80"), "out tcp dst=192.0.2.2:80", False),
        (ir.dport("udp", "53", "80"), "out udp dst=192.0.2.2:80", True),
        (ir.proto("tcp"), "out tcp dst=[2001:db8::2]:53", True),
        (ir.Match("nfproto", ("ipv6",)), "in tcp dst=[2001:db8::1]:80", True),
        (ir.Match("nfproto", ("ipv6",)), "in tcp dst=192.0.2.1:80", False),
        (ir.owner("uid", "1337", negated=True), "in tcp dst=192.0.2.1:80", False),
        (ir.owner("uid", "1337", negated=True), "out tcp uid=7 dst=192.0.2.1:80", True),
    ],
)
def test_matches_carry_their_implicit_dependencies(
    match: ir.Match, spec: str, matches: bool
) -> None:
    test = conditions.condition(match, {"v4": ("192.0.2.0/24", "10.0.0.0/8")})
    assert test(probe.parse(spec), conditions.Packet(mark=0)) is matches


def test_tproxy_inbound_and_dns_capture() -> None:
    flags = {
        **STANDARD,
        "inbound_interception_mode": "TPROXY",
        "redirect_dns": "true",
        "capture_all_dns": "true",
    }
    for verdict in _both(flags, "in tcp src=198.51.100.2:4000 dst=192.0.2.1:8080"):
        assert (verdict.kind, verdict.port) == ("tproxy", 15006)
    for verdict in _both(flags, "out udp uid=1000 dst=192.0.2.53:53"):
        assert (verdict.kind, verdict.port) == ("redirect", 15053)
    for verdict in _both(flags, "out udp uid=1337 dst=192.0.2.53:53"):
        assert verdict.kind == "none"


def test_drop_invalid_drops_invalid_packets() -> None:
    for verdict in _both(
        {**STANDARD, "drop_invalid": "true"}, "in tcp dst=192.0.2.1:8080 state=invalid"
    ):
        assert verdict.kind == "drop"


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "sideways tcp dst=1.2.3.4:80",
        "out dst=1.2.3.4",
        "out tcp dst=1.2.3.4:99999",
        "out tcp uid=x dst=1.2.3.4:80",
        "out tcp colour=blue dst=1.2.3.4:80",
        "out tcp",
    ],
)
def test_bad_probe_syntax_names_the_expected_form(spec: str) -> None:
    with pytest.raises(OptionError, match=re.escape("expected e.g. 'out tcp uid=1000")):
        probe.parse(spec)


def test_cli_bad_probe_exits_1_and_json_output() -> None:
    bad = meshnet(["explain", "--enable-ipv6", "false", "--probe", "out tcp"])
    assert bad.returncode == 1 and "expected e.g." in bad.stderr
    good = meshnet(
        [
            "explain",
            "-i",
            "*",
            "--enable-ipv6",
            "false",
            "--output",
            "json",
            "--probe",
            "out tcp uid=1000 dst=192.0.2.9:443",
        ]
    )
    assert good.returncode == 0, good.stderr
    (result,) = json.loads(good.stdout)
    assert result["verdict"]["kind"] == "redirect" and result["verdict"]["port"] == 15001
    assert [step["chain"] for step in result["path"]] == [
        "OUTPUT",
        "ISTIO_OUTPUT",
        "ISTIO_REDIRECT",
    ]


# Addresses per family: the pod's own (FakeSystem below), loopback, the passthrough source
# range, a neighbour and an off-link destination.
POD = {4: "192.0.2.1", 6: "2001:db8::1"}
DESTINATIONS = {
    4: ["192.0.2.1", "192.0.2.2", "127.0.0.1", "127.0.0.5", "10.1.2.3", "198.51.100.7"],
    6: ["2001:db8::1", "2001:db8::2", "::1", "2001:db8:1::5", "fd00::7"],
}
PASSTHROUGH = {4: "127.0.0.6", 6: "::6"}
PROBES_PER_PLAN = 20
PORTS = [53, 80, 8080, 15001, 15006, 15008, 15020, 15021, 15053, 31000, 32000]


def _build(flags: dict[str, str], env: dict[str, str]) -> options.Options:
    return options.build(options.gather(flags, env), FakeSystem(tuple(POD.values())))


def _probe_spec(data: st.DataObject, opts: options.Options) -> str:
    """A probe of either family; `out` ones run as every proxy uid/gid, an app id or root."""
    version = data.draw(st.sampled_from([4, 6]))
    dst = data.draw(st.sampled_from(DESTINATIONS[version]))
    host = f"[{dst}]" if version == 6 else dst
    words = [
        data.draw(st.sampled_from(["out", "in"])),
        data.draw(st.sampled_from(["tcp", "udp"])),
        f"dst={host}:{data.draw(st.sampled_from(PORTS))}",
        f"state={data.draw(st.sampled_from(['new', 'established']))}",
        f"local={POD[4]},{POD[6]}",
    ]
    owners = [int(i) for i in (*opts.proxy_uids, *opts.proxy_gids) if i.isdigit()]
    ids = st.sampled_from(sorted({0, 1000, 3000, *owners}))
    words += [f"uid={data.draw(ids)}", f"gid={data.draw(ids)}"]
    if data.draw(st.booleans()):  # the proxy's inbound passthrough source
        source = PASSTHROUGH[version]
        words.append(f"src=[{source}]:4000" if version == 6 else f"src={source}:4000")
    return " ".join(words)


@settings(max_examples=200, deadline=None)
@given(
    flags=flag_values,
    env=env_values,
    ipv6=st.sampled_from(["auto", "true", "false"]),
    dual_stack=bools,
    data=st.data(),
)
def test_iptables_and_nft_plans_give_the_same_verdict(
    flags: dict[str, str], env: dict[str, str], ipv6: str, dual_stack: str, data: st.DataObject
) -> None:
    """Both families, IPv6 on or off (detected from a dual-stack pod, with and without
    --dual-stack): the nft plan sends every probe where the iptables plan does."""
    opts = _build({**flags, "enable_ipv6": ipv6, "dual_stack": dual_stack}, env)
    ipt_plan, nft_plan = iptables.ruleset(opts), nftables.ruleset(opts)
    for _ in range(PROBES_PER_PLAN):
        spec = _probe_spec(data, opts)
        parsed = probe.parse(spec)
        ipt = explain.explain_iptables(ipt_plan, parsed).verdict
        nft = explain.explain_nft(nft_plan, parsed).verdict
        assert (ipt.kind, ipt.port) == (nft.kind, nft.port), spec
        if parsed.family == "ipv6" and not opts.enable_ipv6:
            assert nft.kind == "none", spec
