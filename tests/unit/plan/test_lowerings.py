"""The two lowerings of the one plan: what each says differently, on hand-made IR.

The conformance goldens check the lowerings on Istio's cases; these pin each stated difference
on its own, so a change to one rule of a lowering shows here by name.
"""

from __future__ import annotations

from meshnet.plan import iptables, ir, nftables


def _plan(*rules: ir.Rule, ipv6: bool = True) -> ir.Plan:
    return ir.Plan(rules, ipv6_enabled=ipv6)


def test_a_port_match_brings_its_protocol_in_iptables_but_not_twice() -> None:
    alone = ir.Rule("nat", "ISTIO_OUTPUT", (ir.dport("udp", "53"),), ir.RETURN, "r")
    both = ir.Rule("nat", "ISTIO_OUTPUT", (ir.proto("tcp"), ir.dport("tcp", "1")), ir.RETURN, "r")
    assert iptables.rule(alone).spec == ("-p", "udp", "--dport", "53", "-j", "RETURN")
    assert iptables.rule(both).spec == ("-p", "tcp", "--dport", "1", "-j", "RETURN")
    assert nftables.rule(alone).spec == ("udp", "dport", "53", "counter", "return")
    assert nftables.rule(both).text == "meta l4proto tcp tcp dport 1 counter return"


def test_an_nft_only_match_is_left_out_of_iptables() -> None:
    source = ir.Rule(
        "mangle",
        "PREROUTING",
        (ir.proto("tcp", nft_only=True), ir.ctstate("invalid")),
        ir.jump("ISTIO_DROP"),
        "r",
    )
    assert iptables.rule(source).spec == (
        "-m",
        "conntrack",
        "--ctstate",
        "INVALID",
        "-j",
        "ISTIO_DROP",
    )
    assert nftables.rule(source).text == "meta l4proto tcp ct state invalid counter jump istio-drop"


def test_nft_orders_matches_except_in_raw() -> None:
    matches = (ir.dport("udp", "53"), ir.dst("192.0.2.1/32"))
    nat = ir.Rule("nat", "ISTIO_OUTPUT_DNS", matches, ir.redirect("15053"), "r", "ipv4")
    raw = ir.Rule("raw", "ISTIO_OUTPUT_DNS", matches, ir.zone("2"), "r", "ipv4")
    assert (
        nftables.rule(nat).text == "ip daddr 192.0.2.1/32 udp dport 53 counter redirect to :15053"
    )
    assert nftables.rule(raw).text == "udp dport 53 ip daddr 192.0.2.1/32 counter ct zone set 2"
    assert iptables.rule(nat).spec[:6] == ("-p", "udp", "--dport", "53", "-d", "192.0.2.1/32")
    assert iptables.rule(nat).spec[-2:] == ("--to-port", "15053")  # Istio's UDP spelling


def test_owners_are_meta_in_raw_only() -> None:
    owner = (ir.owner("uid", "1337"),)
    assert nftables.rule(ir.Rule("raw", "ISTIO_OUTPUT_DNS", owner, ir.zone("1"), "r")).spec[:3] == (
        "meta",
        "skuid",
        "1337",
    )
    assert nftables.rule(ir.Rule("nat", "ISTIO_OUTPUT", owner, ir.RETURN, "r")).spec[:2] == (
        "skuid",
        "1337",
    )


def test_a_rule_per_family_without_an_address_is_one_nft_rule() -> None:
    jump = ir.jump("ISTIO_OUTPUT_DNS")
    v4 = ir.Rule("nat", "ISTIO_OUTPUT", (), jump, "r", "ipv4")
    v6_only = ir.Rule("nat", "ISTIO_OUTPUT", (ir.dst("2001:db8::1/128"),), ir.RETURN, "r", "ipv6")
    plan = _plan(v4, v6_only, ipv6=False)
    assert [r.line() for r in iptables.lower(plan).ipv4] == ["-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS"]
    assert iptables.lower(plan).ipv6 == ()
    nft_rules = [r.text for r in nftables.lower(plan).rules() if r.spec != nftables.IPV4_ONLY]
    assert nft_rules == ["counter jump istio-output-dns"]  # the ip6 address rule waits for IPv6
    with_v6 = [r.text for r in nftables.lower(_plan(v4, v6_only)).rules()]
    assert with_v6 == ["counter jump istio-output-dns", "ip6 daddr 2001:db8::1/128 counter return"]


def test_inserts_are_one_based_in_iptables_and_zero_based_in_nft() -> None:
    first = ir.Rule("nat", "PREROUTING", (ir.iif("eth1"),), ir.RETURN, "r", insert_at=1)
    second = ir.Rule("nat", "PREROUTING", (ir.iif("eth2"),), ir.RETURN, "r", insert_at=1)
    assert iptables.rule(second).line() == "-I PREROUTING 1 -i eth2 -j RETURN"
    ops = [(r.requested_index, r.index) for r in nftables.lower(_plan(first, second)).rules()]
    assert ops == [(0, None), (0, 0)]  # Istio appends into an empty chain
