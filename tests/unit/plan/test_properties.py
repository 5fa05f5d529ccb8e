"""Property tests: the plan never fails on valid options, and its restore text loads back
into exactly the per-chain rule lists of the model (simulating iptables-restore --noflush)."""

from __future__ import annotations

from hypothesis import given, settings

from meshnet.config import options
from meshnet.plan import iptables
from meshnet.plan.model import Family, Ruleset
from meshnet.render import restore, transcript
from tests.support.cli import restore_blocks
from tests.support.fakes import FakeSystem
from tests.support.restore_sim import simulate_restore
from tests.support.strategies import env_values, flag_values


def _plan(flags: dict[str, str], env: dict[str, str]) -> Ruleset:
    raw = options.gather(flags, env)
    return iptables.ruleset(options.build(raw, FakeSystem()))


def _model_chains(ruleset: Ruleset, family: Family) -> dict[str, dict[str, list[tuple[str, ...]]]]:
    return {
        table: {chain: [(chain, *r.spec) for r in rules] for chain, rules in chains.items()}
        for table, chains in ruleset.chains(family).items()
    }


@settings(max_examples=300, deadline=None)
@given(flags=flag_values, env=env_values)
def test_restore_text_loads_back_into_the_model(flags: dict[str, str], env: dict[str, str]) -> None:
    ruleset = _plan(flags, env)
    blocks = restore_blocks(restore.render(ruleset))
    assert sorted(blocks) == sorted(ruleset.families())
    for family in ruleset.families():
        loaded = simulate_restore(blocks[family])
        expected = _model_chains(ruleset, family)
        for table, chains in expected.items():
            for chain, rules in chains.items():
                assert loaded[table][chain] == rules, (family, table, chain)
        for table, chains in loaded.items():
            for chain, rules in chains.items():
                assert rules == expected.get(table, {}).get(chain, []), (family, table, chain)


@settings(max_examples=100, deadline=None)
@given(flags=flag_values, env=env_values)
def test_every_rule_has_a_reason_and_transcript_renders(
    flags: dict[str, str], env: dict[str, str]
) -> None:
    ruleset = _plan(flags, env)
    assert all(rule.reason for f in ruleset.families() for rule in ruleset.rules(f))
    text = transcript.render(ruleset)
    assert text.startswith("iptables-save\nip6tables-save\n")
    cleanup = transcript.render(ruleset, cleanup_only=True)
    assert "-A " not in cleanup
