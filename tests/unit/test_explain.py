"""explain: probe syntax, verdicts on the standard plan, and iptables/nft plans agreeing."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnet import explain, nftplan, options, planner, probe
from meshnet.errors import OptionError
from tests.support import meshnet
from tests.unit.test_options import FakeSystem
from tests.unit.test_planner_properties import flag_values

STANDARD = {
    "proxy_uid": "1337",
    "inbound_interception_mode": "REDIRECT",
    "service_cidr": "*",
    "service_exclude_cidr": "",
    "inbound_ports": "*",
    "local_exclude_ports": "15090,15021,15020",
    "enable_ipv6": "true",
}


def _both(flags: dict[str, str], spec: str) -> tuple[explain.Verdict, explain.Verdict]:
    opts = options.build(options.gather(flags, {}), FakeSystem())
    parsed = probe.parse(spec)
    return (
        explain.explain_iptables(planner.plan(opts), parsed).verdict,
        explain.explain_nft(nftplan.plan_nft(opts), parsed).verdict,
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


probes = st.builds(
    lambda direction, proto, uid, gid, dst, port, state: (
        f"{direction} {proto} uid={uid} gid={gid} dst={dst}:{port} state={state}"
    ),
    st.sampled_from(["out", "in"]),
    st.sampled_from(["tcp", "udp"]),
    st.sampled_from([0, 1000, 1337, 3000]),
    st.sampled_from([0, 1337, 3000]),
    st.sampled_from(["192.0.2.1", "192.0.2.2", "127.0.0.1", "10.1.2.3", "198.51.100.7"]),
    st.sampled_from([53, 80, 8080, 15006, 15008, 15020, 15021, 31000, 32000]),
    st.sampled_from(["new", "established"]),
)


@settings(max_examples=300, deadline=None)
@given(flags=flag_values, spec=probes)
def test_iptables_and_nft_plans_give_the_same_verdict(flags: dict[str, str], spec: str) -> None:
    flags = {**flags, "enable_ipv6": "false"}
    ipt, nft = _both(flags, spec)
    assert (ipt.kind, ipt.port) == (nft.kind, nft.port)
