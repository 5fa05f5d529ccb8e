"""The nftables lowering of the plan: Istio's quirks, properties, own goldens, nft --check.

Set MESHNET_REFRESH_GOLDENS=1 to rewrite tests/goldens/*.nft, then review the diff like code.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import pytest
from hypothesis import given, settings

from meshnet.cli.app import istio_iptables
from meshnet.config import options
from meshnet.config.options import Options
from meshnet.plan import nftables
from meshnet.plan.nftables import IPV4_ONLY, MANGLE, NAT, RAW, NftRule, NftRuleset
from meshnet.render import nft
from tests.support.fakes import FakeSystem
from tests.support.goldens import CASES
from tests.support.nft_sim import Chains, simulate
from tests.support.repo import IN_CI, REPO
from tests.support.strategies import env_values, flag_values

GOLDENS = REPO / "tests" / "goldens"
NFT_GOLDENS = ("standard", "tproxy", "dns-capture", "standard-dual-stack")
BASE = ["-p", "15001", "-z", "15006", "-e", "15008", "-u", "1337", "-g", "1337"]
V6 = ["--enable-ipv6", "true"]
V4 = ["--enable-ipv6", "false"]

GUARD = " ".join(IPV4_ONLY)  # meshnet's first rule of each base chain with IPv6 off


def _options(args: list[str], env: Mapping[str, str] | None = None) -> Options:
    """Options from an istio-iptables argv, parsed by the real click command."""
    given_ = istio_iptables.make_context("istio-iptables", [*args, "--native-nftables"]).params
    return options.build(options.gather(given_, env or {}), FakeSystem())


def _plan(args: list[str], env: Mapping[str, str] | None = None) -> NftRuleset:
    return nftables.ruleset(_options(args, env))


def _final(ruleset: NftRuleset) -> Chains:
    """The model's final per-chain order, as rule texts (as the renderer writes them)."""
    return {
        table: {chain: [nft.rule_text(rule) for rule in rules] for chain, rules in chains.items()}
        for table, chains in ruleset.chains().items()
    }


def _ops(ruleset: NftRuleset, table: str, chain: str) -> list[NftRule]:
    """Istio's operations on one chain (meshnet's IPv6 guard left out)."""
    return [
        rule
        for rule in ruleset.rules()
        if rule.table == table and rule.chain == chain and rule.spec != IPV4_ONLY
    ]


def test_first_insert_into_an_empty_chain_becomes_an_add() -> None:
    ruleset = _plan([*BASE, "-k", "eth1,eth2", *V4])
    first, second = _ops(ruleset, NAT, "prerouting")
    assert (first.requested_index, first.index, first.verb) == (0, None, "add")
    assert (second.requested_index, second.index, second.verb) == (0, 0, "insert")
    assert _final(ruleset)[NAT]["prerouting"] == [
        GUARD,
        "iifname eth2 counter return",
        "iifname eth1 counter return",
    ]


def test_insert_at_the_chain_length_becomes_an_add() -> None:
    """TPROXY with -b '': mangle istio-inbound is empty, so indexes 0, 1, 2 are all appends."""
    ruleset = _plan([*BASE, "-m", "TPROXY", "-b", "", *V4])
    inbound = _ops(ruleset, MANGLE, "istio-inbound")
    assert [(r.requested_index, r.index) for r in inbound] == [(0, None), (1, None), (2, None)]
    inserts = [line for line in nft.render(ruleset).splitlines() if "insert rule" in line]
    assert all(line.endswith(f" index 0 {GUARD}") for line in inserts)


def test_insert_below_the_chain_length_stays_an_insert() -> None:
    ruleset = _plan([*BASE, "-m", "TPROXY", "-b", "*", *V4])
    inbound = _ops(ruleset, MANGLE, "istio-inbound")
    assert [r.index for r in inbound] == [None, None, 0, 1, 2]


# --- TPROXY head-of-chain order ---------------------------------------------------------------

MARK = "meta l4proto tcp mark 1337 counter return"
LO4 = "iifname lo meta l4proto tcp ip saddr 127.0.0.6/32 counter return"
LO6 = "iifname lo meta l4proto tcp ip6 saddr ::6/128 counter return"
NOT_1338 = "iifname lo meta l4proto tcp mark != 1338 counter return"


def test_tproxy_inbound_head_with_ipv6_is_mark_v6_not1338_v4() -> None:
    """Istio inserts both passthrough rules at index 1: ::6 lands before mark != 1338."""
    ruleset = _plan([*BASE, "-m", "TPROXY", "-b", "*", *V6])
    assert [r.index for r in _ops(ruleset, MANGLE, "istio-inbound")][-4:] == [0, 1, 1, 2]
    assert _final(ruleset)[MANGLE]["istio-inbound"] == [
        MARK,
        LO6,
        NOT_1338,
        LO4,
        "meta l4proto tcp ct state related,established counter jump istio-divert",
        "meta l4proto tcp counter jump istio-tproxy",
    ]


def test_tproxy_inbound_head_ipv4_only_keeps_iptables_order() -> None:
    ruleset = _plan([*BASE, "-m", "TPROXY", "-b", "*", *V4])
    assert _final(ruleset)[MANGLE]["istio-inbound"][:3] == [MARK, LO4, NOT_1338]


def test_tproxy_with_empty_inbound_and_ipv6_mixes_adds_and_inserts() -> None:
    ruleset = _plan([*BASE, "-m", "TPROXY", "-b", "", *V6])
    assert [r.index for r in _ops(ruleset, MANGLE, "istio-inbound")] == [None, None, 1, 2]
    assert _final(ruleset)[MANGLE]["istio-inbound"] == [MARK, LO6, NOT_1338, LO4]


def test_tproxy_rules_exist_even_with_empty_inbound_ports() -> None:
    chains = _final(_plan([*BASE, "-m", "TPROXY", "-b", "", *V4]))[MANGLE]
    assert list(chains) == ["prerouting", "output", "istio-inbound"]  # no divert/tproxy chains


# --- inet merging and IPv6 ----------------------------------------------------------------------

RICH = [
    *BASE,
    "-m",
    "TPROXY",
    "-b",
    "*",
    "-i",
    "10.0.0.0/8,2001:db8::/32",
    "-x",
    "10.1.0.0/16,2001:db8:1::/48",
    "-k",
    "eth1",
    "--redirect-dns",
    "--dns-servers",
    "192.0.2.53,2001:db8::53",
]


def _family_free(ruleset: NftRuleset) -> list[tuple[str, str, tuple[str, ...]]]:
    return [
        (r.table, r.chain, r.spec)
        for r in ruleset.rules()
        if "ip6" not in r.spec and r.spec != IPV4_ONLY
    ]


def test_a_rule_without_addresses_is_one_inet_rule_for_both_families() -> None:
    with_v6, without_v6 = _plan([*RICH, *V6]), _plan([*RICH, *V4])
    assert _family_free(with_v6) == _family_free(without_v6)
    jumps = [r for r in with_v6.rules() if r.text == "counter jump istio-output"]
    assert len(jumps) == 1


def test_ipv6_rules_are_absent_without_ipv6() -> None:
    ruleset = _plan([*RICH, *V4])
    assert not [r.text for r in ruleset.rules() if "ip6" in r.spec]
    assert any("ip6" in r.spec for r in _plan([*RICH, *V6]).rules())


def test_ipv4_passthrough_rule_is_always_present() -> None:
    rules = _final(_plan([*BASE, *V4]))[NAT]["istio-output"]
    assert rules[0] == "oifname lo ip saddr 127.0.0.6/32 counter return"


def test_wildcard_include_is_a_single_inet_jump() -> None:
    chains = _final(_plan([*BASE, "-i", "*", "-k", "eth1", *V6]))[NAT]
    assert chains["istio-output"].count("counter jump istio-redirect") == 1
    assert chains["prerouting"][0] == "iifname eth1 counter jump istio-redirect"


# --- owner groups -------------------------------------------------------------------------------


def test_owner_group_include_is_one_rule_of_negated_matches() -> None:
    ruleset = _plan([*BASE, *V4], {"ISTIO_OUTBOUND_OWNER_GROUPS": "java,202,ftp"})
    assert (
        "skgid != java skgid != 202 skgid != ftp counter return"
        in (_final(ruleset)[NAT]["istio-output"])
    )


def test_empty_owner_group_include_returns_everything() -> None:
    rules = _final(_plan([*BASE, *V4], {"ISTIO_OUTBOUND_OWNER_GROUPS": ""}))[NAT]["istio-output"]
    assert "counter return" in rules


def test_owner_group_exclude_is_one_rule_per_group() -> None:
    env = {"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "888,ftp"}
    rules = _final(_plan([*BASE, *V4], env))[NAT]["istio-output"]
    assert ["skgid 888 counter return", "skgid ftp counter return"] == [
        r for r in rules if r.startswith("skgid") and "1337" not in r
    ]


# --- DNS ------------------------------------------------------------------------------------------


def test_capture_all_dns_matches_no_server() -> None:
    chains = _final(_plan([*BASE, "--redirect-dns", "--capture-all-dns", *V6]))
    assert chains[NAT]["istio-output-dns"] == [
        "meta l4proto tcp tcp dport 53 counter redirect to :15053",
        "udp dport 53 counter redirect to :15053",
    ]
    assert chains[RAW]["prerouting"] == ["counter jump istio-inbound"]
    assert chains[RAW]["istio-inbound"] == ["udp sport 53 counter ct zone set 1"]
    assert chains[RAW]["istio-output-dns"][-1] == "udp dport 53 counter ct zone set 2"


def test_dns_per_server_matches_each_address() -> None:
    args = [*BASE, "--redirect-dns", "--dns-servers", "192.0.2.53,2001:db8::53", *V6]
    chains = _final(_plan(args))
    assert chains[NAT]["istio-output-dns"] == [
        "ip daddr 192.0.2.53/32 tcp dport 53 counter redirect to :15053",
        "ip6 daddr 2001:db8::53/128 tcp dport 53 counter redirect to :15053",
        "ip daddr 192.0.2.53/32 udp dport 53 counter redirect to :15053",
        "ip6 daddr 2001:db8::53/128 udp dport 53 counter redirect to :15053",
    ]
    assert chains[RAW]["istio-inbound"] == [
        "udp sport 53 ip saddr 192.0.2.53/32 counter ct zone set 1",
        "udp sport 53 ip6 saddr 2001:db8::53/128 counter ct zone set 1",
    ]
    assert chains[NAT]["istio-output"].count("counter jump istio-output-dns") == 1


def test_dns_uid_rule_skips_port_53_and_the_tunnel_but_gid_rule_does_not() -> None:
    args = [*BASE, "--redirect-dns", "--dns-servers", "192.0.2.53", *V4]
    rules = _final(_plan(args))[NAT]["istio-output"]
    uid, gid = (r for r in rules if "jump istio-in-redirect" in r)
    assert "tcp dport != { 53, 15008 } skuid 1337" in uid
    assert "tcp dport != 15008 skgid 1337" in gid


def test_redirect_dns_without_servers_is_off_with_a_warning() -> None:
    ruleset = _plan([*BASE, "--redirect-dns", "--dns-servers", "", *V6])
    assert ruleset.table(RAW) is None
    assert ruleset.warnings and "DNS capture disabled" in ruleset.warnings[0]


def test_v6_only_dns_servers_without_ipv6_jump_to_missing_chains() -> None:
    """Istio's quirk, kept: the inet jumps are added although no rule fills their chains."""
    args = [*BASE, "--redirect-dns", "--dns-servers", "2001:db8::53", *V4]
    chains = _final(_plan(args))
    assert "counter jump istio-output-dns" in chains[NAT]["istio-output"]
    assert "istio-output-dns" not in chains[NAT]
    assert chains[RAW]["prerouting"] == [GUARD, "counter jump istio-inbound"]
    assert "istio-inbound" not in chains[RAW]


# --- cleanup, chains, reasons ------------------------------------------------------------------


def test_cleanup_only_adds_then_deletes_each_table() -> None:
    ruleset = _plan([*BASE, "-m", "TPROXY", "-b", "*", "--cleanup-only", *V6])
    assert ruleset.cleanup_only and list(ruleset.rules()) == []
    assert nft.render(ruleset) == (
        "add table inet istio-proxy-nat\n"
        "delete table inet istio-proxy-nat\n"
        "add table inet istio-proxy-mangle\n"
        "delete table inet istio-proxy-mangle\n"
        "add table inet istio-proxy-raw\n"
        "delete table inet istio-proxy-raw\n"
    )


def test_only_chains_with_rules_are_created_in_istios_order() -> None:
    ruleset = _plan([*BASE, "-b", "*", *V4])
    nat = ruleset.table(NAT)
    assert nat is not None
    assert [c.name for c in nat.chains] == [
        "prerouting",
        "output",
        "istio-inbound",
        "istio-redirect",
        "istio-in-redirect",
        "istio-output",
    ]
    assert [t.name for t in ruleset.tables] == [NAT]


def test_mangle_output_is_a_route_chain() -> None:
    text = nft.render(_plan([*BASE, "-m", "TPROXY", "-b", "*", *V4]))
    assert (
        "add chain inet istio-proxy-mangle output { type route hook output priority -150 ; }"
        in text.splitlines()
    )


def test_every_rule_has_a_reason() -> None:
    assert all(rule.reason for rule in _plan([*RICH, "--drop-invalid", *V6]).rules())


# --- properties ---------------------------------------------------------------------------------


def _dangling_dns_jumps_expected(o: Options) -> bool:
    """The one config where Istio jumps to chains it never creates (see the quirk test)."""
    return (
        o.redirect_dns
        and not o.capture_all_dns
        and not o.dns_servers_v4
        and bool(o.dns_servers_v6)
        and not o.enable_ipv6
    )


@settings(max_examples=300, deadline=None)
@given(flags=flag_values, env=env_values)
def test_rendered_transaction_simulates_to_the_model_order(
    flags: dict[str, str], env: dict[str, str]
) -> None:
    o = options.build(options.gather(flags, env), FakeSystem())
    ruleset = nftables.ruleset(o)
    assert simulate(nft.render(ruleset)) == _final(ruleset)
    assert all(rule.reason for rule in ruleset.rules())
    if _dangling_dns_jumps_expected(o):
        return
    declared = {t.name: {c.name for c in t.chains} for t in ruleset.tables}
    for rule in ruleset.rules():
        if "jump" in rule.spec:
            target = rule.spec[rule.spec.index("jump") + 1]
            assert target in declared[rule.table], rule


@settings(max_examples=100, deadline=None)
@given(flags=flag_values, env=env_values)
def test_ipv6_only_adds_ip6_rules(flags: dict[str, str], env: dict[str, str]) -> None:
    v4 = nftables.ruleset(
        options.build(options.gather({**flags, "enable_ipv6": "false"}, env), FakeSystem())
    )
    v6 = nftables.ruleset(
        options.build(options.gather({**flags, "enable_ipv6": "true"}, env), FakeSystem())
    )
    assert _family_free(v6) == _family_free(v4)
    assert not any("ip6" in rule.spec for rule in v4.rules())
    assert _guarded_chains(v4) == _base_chains(v4)
    assert _guarded_chains(v6) == []


def _base_chains(ruleset: NftRuleset) -> list[tuple[str, str]]:
    return [(t.name, c.name) for t in ruleset.tables for c in t.chains if c.is_base]


def _guarded_chains(ruleset: NftRuleset) -> list[tuple[str, str]]:
    """Chains whose first rule is the guard; the guard must be nowhere else."""
    final = _final(ruleset)
    guards = [
        (t, c) for t, chains in final.items() for c, rules in chains.items() if GUARD in rules
    ]
    assert all(final[t][c].count(GUARD) == 1 and final[t][c][0] == GUARD for t, c in guards)
    return guards


def test_ipv6_off_guards_every_base_chain_first() -> None:
    """-k inserts at index 0 of nat prerouting; the guard still ends up in front of it."""
    ruleset = _plan([*RICH, "--drop-invalid", *V4])
    base = _base_chains(ruleset)
    assert {table for table, _ in base} == {NAT, MANGLE, RAW} and len(base) == 6
    assert _guarded_chains(ruleset) == base
    prerouting = _final(ruleset)[NAT]["prerouting"]
    assert prerouting[0] == GUARD and prerouting[1].startswith("iifname eth1 ")


# --- meshnet's own goldens ----------------------------------------------------------------------


@pytest.mark.parametrize("name", NFT_GOLDENS)
def test_own_nft_golden(name: str) -> None:
    text = nft.render(_plan(CASES[name]))
    golden = GOLDENS / f"{name}.nft"
    if os.environ.get("MESHNET_REFRESH_GOLDENS") == "1":
        golden.write_text(text)
    assert text == golden.read_text()


# --- the real nft accepts the transaction (throwaway namespace, never the host's ruleset) -------

CHECKED = {
    "standard": CASES["standard"],
    "tproxy-dns-dual-stack": [
        *RICH,
        "-d",
        "15090,15021,15020",
        "-o",
        "15020",
        "-q",
        "32000",
        "-c",
        "eth9",
        "--drop-invalid",
        "--dual-stack",
        *V6,
    ],
    "tproxy-capture-all-dns": [
        *BASE,
        "-m",
        "TPROXY",
        "-b",
        "8080,9090",
        "-i",
        "*",
        "--redirect-dns",
        "--capture-all-dns",
        *V6,
    ],
    "cleanup": [*BASE, "--cleanup-only", *V6],
    "ipv4-only-tproxy-virt-dns": [*RICH, "-k", "eth1", "--redirect-dns", "--capture-all-dns", *V4],
}


def _run(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=30, check=False
    )


def _require_nft_netns() -> None:
    reason = None
    if os.geteuid() != 0:
        reason = "needs root (creates a network namespace)"
    elif shutil.which("nft") is None or shutil.which("ip") is None:
        reason = "needs nft and iproute2"
    if reason is not None:
        if IN_CI:
            pytest.fail(f"nft check cannot run: {reason}", pytrace=False)
        pytest.skip(reason)


@contextmanager
def _throwaway_netns() -> Iterator[str]:
    """A fresh `mnt-<random>` namespace, always deleted."""
    name = f"mnt-{secrets.token_hex(4)}"
    made = _run("ip", "netns", "add", name)
    if made.returncode != 0:
        pytest.fail(f"ip netns add {name} failed: {made.stderr.strip()}")
    try:
        yield name
    finally:
        deleted = _run("ip", "netns", "delete", name)
        assert deleted.returncode == 0, f"could not delete namespace {name}: {deleted.stderr}"


@pytest.mark.parametrize("name", sorted(CHECKED))
def test_nft_check_accepts_the_transaction(name: str) -> None:
    _require_nft_netns()
    text = nft.render(_plan(CHECKED[name]))
    with _throwaway_netns() as ns:
        checked = _run("ip", "netns", "exec", ns, "nft", "--check", "-f", "-", stdin=text)
    assert checked.returncode == 0, f"{checked.stderr}\n{text}"
