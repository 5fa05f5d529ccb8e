"""The cleanup commands (Istio's BuildCleanupV4/V6): exact commands and order, without root.

The last tests replay them on the tables the plan's own restore text builds, the way iptables
would run them (a `-D` needs the exact rule, `-X` an empty chain nothing jumps to).
"""

from __future__ import annotations

from itertools import pairwise

import pytest

from meshnet.plan import iptables
from meshnet.plan.cleanup import cleanup_commands
from meshnet.plan.model import PREDEFINED, Rule
from meshnet.render import restore, transcript
from tests.support.cli import STANDARD_ARGS, restore_blocks
from tests.support.fakes import options_from_argv
from tests.support.goldens import CASES
from tests.support.restore_sim import simulate_restore

Tables = dict[str, dict[str, list[tuple[str, ...]]]]


def _rule(table: str, chain: str, spec: str, insert_at: int | None = None) -> Rule:
    return Rule(table, chain, tuple(spec.split()), "test", insert_at)


def test_no_rules_no_commands() -> None:
    assert cleanup_commands([]) == []


def test_deletes_in_reverse_then_flushes_and_deletes_each_chain_that_holds_rules() -> None:
    rules = [
        _rule("nat", "PREROUTING", "-p tcp -j ISTIO_INBOUND"),
        _rule("nat", "ISTIO_INBOUND", "-p tcp --dport 15008 -j RETURN"),
        _rule("nat", "ISTIO_INBOUND", "-p tcp -j ISTIO_IN_REDIRECT"),
        _rule("nat", "ISTIO_IN_REDIRECT", "-p tcp -j REDIRECT --to-ports 15006"),
        _rule("mangle", "ISTIO_INBOUND", "-p tcp -j ISTIO_TPROXY", insert_at=1),
        _rule("raw", "OUTPUT", "-p udp --dport 53 -j CT --zone 1"),
    ]
    assert cleanup_commands(rules) == [
        # Built-in chains: every rule, whatever its target.
        ("-t", "raw", "-D", "OUTPUT", "-p", "udp", "--dport", "53", "-j", "CT", "--zone", "1"),
        # An inserted rule is deleted by its spec, without the position.
        ("-t", "mangle", "-D", "ISTIO_INBOUND", "-p", "tcp", "-j", "ISTIO_TPROXY"),
        # ISTIO_* chains: only the jumps into other ISTIO_* chains; RETURN and REDIRECT rules
        # go with the flush.
        ("-t", "nat", "-D", "ISTIO_INBOUND", "-p", "tcp", "-j", "ISTIO_IN_REDIRECT"),
        ("-t", "nat", "-D", "PREROUTING", "-p", "tcp", "-j", "ISTIO_INBOUND"),
        # Each (chain, table) once, in reverse order of first appearance; a jump target that
        # holds no rule (mangle ISTIO_TPROXY) is not flushed, as in Istio.
        ("-t", "mangle", "-F", "ISTIO_INBOUND"),
        ("-t", "mangle", "-X", "ISTIO_INBOUND"),
        ("-t", "nat", "-F", "ISTIO_IN_REDIRECT"),
        ("-t", "nat", "-X", "ISTIO_IN_REDIRECT"),
        ("-t", "nat", "-F", "ISTIO_INBOUND"),
        ("-t", "nat", "-X", "ISTIO_INBOUND"),
    ]


def test_a_user_chain_that_is_not_istios_is_flushed_like_one() -> None:
    # Istio's test is "not built-in", not "ISTIO_": a rule in another chain is deleted too.
    rules = [_rule("filter", "OUTPUT", "-j MYCHAIN"), _rule("filter", "MYCHAIN", "-j ACCEPT")]
    assert cleanup_commands(rules) == [
        ("-t", "filter", "-D", "MYCHAIN", "-j", "ACCEPT"),
        ("-t", "filter", "-D", "OUTPUT", "-j", "MYCHAIN"),
        ("-t", "filter", "-F", "MYCHAIN"),
        ("-t", "filter", "-X", "MYCHAIN"),
    ]


STANDARD_CLEANUP = """\
iptables-save
ip6tables-save
iptables -t nat -D ISTIO_OUTPUT -j ISTIO_REDIRECT
iptables -t nat -D ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner \
--gid-owner 1337 -j ISTIO_IN_REDIRECT
iptables -t nat -D ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner \
--uid-owner 1337 -j ISTIO_IN_REDIRECT
iptables -t nat -D OUTPUT -j ISTIO_OUTPUT
iptables -t nat -D ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
iptables -t nat -D PREROUTING -p tcp -j ISTIO_INBOUND
iptables -t nat -F ISTIO_OUTPUT
iptables -t nat -X ISTIO_OUTPUT
iptables -t nat -F ISTIO_INBOUND
iptables -t nat -X ISTIO_INBOUND
iptables -t nat -F ISTIO_IN_REDIRECT
iptables -t nat -X ISTIO_IN_REDIRECT
iptables -t nat -F ISTIO_REDIRECT
iptables -t nat -X ISTIO_REDIRECT
iptables-save
"""


def test_standard_cleanup_transcript() -> None:
    ruleset = iptables.ruleset(options_from_argv([*STANDARD_ARGS, "--enable-ipv6", "false"]))
    assert transcript.render(ruleset, cleanup_only=True) == STANDARD_CLEANUP


def test_dual_stack_cleanup_is_the_same_commands_per_family() -> None:
    ruleset = iptables.ruleset(options_from_argv(CASES["standard-dual-stack"]))
    lines = transcript.render(ruleset, cleanup_only=True).splitlines()
    v4 = STANDARD_CLEANUP.splitlines()[2:-1]
    v6 = [line.replace("iptables ", "ip6tables ").replace("127.0.0.1/32", "::1/128") for line in v4]
    assert lines == ["iptables-save", "ip6tables-save", *v4, *v6, "iptables-save", "ip6tables-save"]


# Golden configurations plus the flags that add chains and built-in-chain rules of their own.
CONFIGS = {
    **CASES,
    "everything-redirect": [
        *STANDARD_ARGS,
        *("-k", "veth+", "-c", "eth1", "-q", "443", "-o", "8080", "-x", "10.96.0.0/12"),
        *("--redirect-dns", "--dns-servers", "192.0.2.53", "--drop-invalid"),
        *("--enable-ipv6", "true"),
    ],
    "tproxy-ports": [
        *STANDARD_ARGS,
        *("-m", "TPROXY", "-b", "80,443", "-i", "10.0.0.0/8", "-k", "net1", "-c", "eth1"),
        *("--redirect-dns", "--capture-all-dns", "--drop-invalid", "--enable-ipv6", "true"),
    ],
    "no-inbound": [*STANDARD_ARGS, "-b", "", "-i", "", "--enable-ipv6", "false"],
}


def _references(tables: Tables, table: str, chain: str) -> list[tuple[str, ...]]:
    return [
        rule
        for rules in tables.get(table, {}).values()
        for rule in rules
        if any(a in ("-j", "-g") and b == chain for a, b in pairwise(rule))
    ]


def _run_cleanup(tables: Tables, commands: list[tuple[str, ...]]) -> None:
    """Apply `-t T -D/-F/-X CHAIN ...` as iptables does, failing where iptables would."""
    for command in commands:
        assert command[0] == "-t", command
        table, op, chain, spec = command[1], command[2], command[3], command[4:]
        chains = tables[table]
        assert chain in chains, f"{command}: no such chain"
        if op == "-D":
            assert (chain, *spec) in chains[chain], f"{command}: no such rule"
            chains[chain].remove((chain, *spec))
        elif op == "-F":
            chains[chain].clear()
        elif op == "-X":
            assert chain not in PREDEFINED, command
            assert not chains[chain], f"{command}: chain not empty"
            assert not _references(tables, table, chain), f"{command}: still jumped to"
            del chains[chain]
        else:
            pytest.fail(f"not a cleanup command: {command}")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cleanup_undoes_the_restore_text_exactly(name: str) -> None:
    """From an empty namespace, restore then cleanup leaves only empty built-in chains."""
    ruleset = iptables.ruleset(options_from_argv(CONFIGS[name]))
    blocks = restore_blocks(restore.render(ruleset))
    for family in ruleset.families():
        tables = simulate_restore(blocks[family])
        _run_cleanup(tables, cleanup_commands(ruleset.rules(family)))
        left = {
            (table, chain): rules
            for table, chains in tables.items()
            for chain, rules in chains.items()
            if rules or chain not in PREDEFINED
        }
        assert left == {}, family
