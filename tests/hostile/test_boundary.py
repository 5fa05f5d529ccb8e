"""The boundary and the renderers, without root: every hostile value is refused by name, and the
renderers refuse or quote what would become syntax even when a bad value slips through."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnet.apply.iptables_tool import _check_restore_text
from meshnet.cli.app import istio_iptables
from meshnet.cni.plugin.pod import decide, origin_of
from meshnet.config import options
from meshnet.config.flags import ALL_FLAGS
from meshnet.errors import (
    BackendError,
    EnvironmentFactError,
    MeshnetError,
    OptionError,
    UnsafeTextError,
)
from meshnet.host.system import read_bounded
from meshnet.plan import iptables, nftables
from meshnet.plan.model import Rule
from meshnet.plan.nftables import NftChain, NftRule, NftRuleset, NftTable
from meshnet.render import nft, restore
from tests.cni.fakes import mesh_pod
from tests.hostile.corpus import CASES, Case, annotation_cases, cli_args, env_args
from tests.support.cli import restore_blocks
from tests.support.fakes import FakeSystem
from tests.support.nft_sim import simulate
from tests.support.restore_sim import simulate_restore


class ReadingSystem(FakeSystem):
    """FakeSystem, but files are read for real (bounded), as on a node."""

    def read_text(self, path: str) -> str:
        return read_bounded(path)


def _refusal(given: dict[str, str | None], env: dict[str, str]) -> str:
    with pytest.raises(OptionError) as caught:
        options.build(options.gather(given, env), ReadingSystem())
    return str(caught.value)


def _assert_clean(message: str, origin: str, value: str) -> None:
    assert "\n" not in message and "\x00" not in message, message
    assert origin in message, message
    assert repr(value)[1:-1][:60] in message, message  # the value, escaped, never raw


def _flags_of(args: list[str]) -> dict[str, str | None]:
    """Command-line arguments as the real click command parses them."""
    params: dict[str, str | None] = istio_iptables.make_context("istio-iptables", args).params
    return params


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_flag_is_refused_naming_it(case: Case) -> None:
    args = cli_args(case)
    if args is None:
        pytest.skip(f"{case.key} has no flag")
    message = _refusal(_flags_of(args), {})
    _assert_clean(message, str(case.flag.long), case.value)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_env_is_refused_naming_it(case: Case) -> None:
    found = env_args(case)
    if found is None:
        pytest.skip(f"{case.key} has no env variable")
    args, env = found
    message = _refusal(_flags_of(args), env)
    _assert_clean(message, f"env {next(iter(env))}", case.value)


@pytest.mark.parametrize(("case", "annotation"), list(annotation_cases()), ids=lambda x: str(x))
def test_annotation_is_refused_naming_it(case: Case, annotation: str) -> None:
    pod = mesh_pod(annotations={annotation: case.value})
    with pytest.raises(OptionError) as caught:
        decision = decide(pod)
        raw = options.gather({}, {})
        for key, text in decision.flags.items():
            raw[key] = options.Raw(text, origin_of(key), explicit=True)
        options.build(raw, FakeSystem())
    message = str(caught.value)
    assert annotation in message and "\n" not in message, message


@pytest.mark.parametrize(
    ("field", "value"),
    [("runAsUser", "abc"), ("runAsUser", "1337\n"), ("runAsUser", True), ("runAsUser", -1),
     ("runAsUser", 2**40), ("runAsGroup", [1]), ("runAsGroup", 1.5)],
)  # fmt: skip
def test_bad_run_as_names_the_pod_field(field: str, value: Any) -> None:
    pod = mesh_pod()
    pod["spec"]["containers"][1]["securityContext"] = {field: value}
    with pytest.raises(OptionError) as caught:
        decide(pod)
    message = str(caught.value)
    assert f"securityContext.{field}" in message and "annotation" not in message, message
    assert "\n" not in message


def test_non_string_annotation_is_refused() -> None:
    pod = mesh_pod(annotations={"traffic.sidecar.istio.io/excludeInterfaces": ["eth0"]})  # type: ignore[dict-item]
    with pytest.raises(OptionError, match="excludeInterfaces"):
        decide(pod)


def test_tproxy_mark_one_is_still_fine() -> None:
    o = options.build(options.gather({"tproxy_mark": "1"}, {}), FakeSystem())
    assert o.tproxy_mark == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [("::127.0.0.53", "::127.0.0.53"), ("2001:DB8::1", "2001:db8::1"),
     ("::ffff:192.0.2.1", "::ffff:192.0.2.1"), ("1:2:3:4:5:6:1.2.3.4", "1:2:3:4:5:6:1.2.3.4"),
     ("2001:db8:0:0:1:0:192.0.2.1", "2001:db8::1:0:192.0.2.1"), ("192.0.2.1", "192.0.2.1")],
)  # fmt: skip
def test_dns_server_text_is_made_from_the_address(text: str, expected: str) -> None:
    o = options.build(options.gather({"dns_servers": text}, {}), FakeSystem())
    assert expected in (*o.dns_servers_v4, *o.dns_servers_v6)


# --- bounded reads ---------------------------------------------------------------------------


def test_bounded_read_refuses_devices_directories_fifos_and_big_files(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big"
    big.write_bytes(b"nameserver 192.0.2.53\n" * 4000)
    for path, reason in [("/dev/zero", "not a regular file"), (str(tmp_path), "not a regular"),
                         (str(fifo), "not a regular file"), (str(big), "larger than")]:  # fmt: skip
        with pytest.raises(EnvironmentFactError, match=reason) as caught:
            read_bounded(path)
        assert "nameserver" not in str(caught.value)
    small = tmp_path / "resolv.conf"
    small.write_text("nameserver 192.0.2.53\n")
    assert read_bounded(str(small)) == "nameserver 192.0.2.53\n"


# --- renderers, fed hostile values directly -----------------------------------------------------

SAFE = re.compile(r"[^\s\"'\\\x00-\x1f\x7f-\x9f]+")


@settings(max_examples=300, deadline=None)
@given(token=st.text(max_size=20))
def test_restore_renderer_writes_a_token_whole_or_refuses(token: str) -> None:
    rule = Rule("nat", "ISTIO_OUTPUT", ("-d", token, "-j", "RETURN"), "test")
    try:
        line = restore.rule_line(rule)
    except UnsafeTextError:
        assert not (SAFE.fullmatch(token) and token.isprintable())
        return
    assert line.split() == ["-A", "ISTIO_OUTPUT", "-d", token, "-j", "RETURN"]
    assert simulate_restore(f"* nat\n-N ISTIO_OUTPUT\n{line}\nCOMMIT\n")["nat"]["ISTIO_OUTPUT"]


@pytest.mark.parametrize("bad", ["a\nCOMMIT", "a\rb", "a\x00b", 'a"b', "a'b", "a b", "a\\b", ""])
def test_restore_renderer_refuses_syntax_in_any_position(bad: str) -> None:
    for rule in (
        Rule("nat", bad, ("-j", "RETURN"), "test"),
        Rule("nat", "ISTIO_OUTPUT", ("-j", bad), "test"),
        Rule(bad, "ISTIO_OUTPUT", ("-j", "RETURN"), "test"),
    ):
        with pytest.raises(UnsafeTextError):
            restore.restore_lines([rule])


def _nft_ruleset(spec: tuple[str, ...], chain: str = "c") -> NftRuleset:
    rule = NftRule("istio-proxy-nat", chain, spec, "test")
    table = NftTable("istio-proxy-nat", "rebuild", (NftChain(chain),), (rule,))
    return NftRuleset((table,), ipv6_enabled=False)


@settings(max_examples=300, deadline=None)
@given(name=st.text(max_size=20))
def test_nft_renderer_quotes_an_interface_name_or_refuses(name: str) -> None:
    try:
        text = nft.render(_nft_ruleset(("iifname", name, "counter", "return")))
    except UnsafeTextError:
        return
    line = text.splitlines()[-1]
    body = line.split(" c ", 1)[1]
    assert body.endswith(" counter return") and "\n" not in name
    written = body[len("iifname ") : -len(" counter return")]
    if written.startswith('"'):  # quoted: the name back, iptables' `+` written as nft's `*`
        inner = written[1:-1]
        assert '"' not in inner and inner.replace("*", "+") == name.replace("*", "+")
    else:
        assert written == name and re.fullmatch(r"[a-z0-9-]+", name)
    assert nft.check_script(text) == text


@pytest.mark.parametrize(
    "bad", ['a"b', "a\nb", 'x;include "/etc/passwd"', "a\\b", "a*b", "\x00", ""]
)
def test_nft_renderer_refuses_what_it_cannot_quote(bad: str) -> None:
    with pytest.raises(UnsafeTextError):
        nft.render(_nft_ruleset(("iifname", bad, "counter", "return")))


@pytest.mark.parametrize(
    "bad", ["1.2.3.4;include", "#", 'x"', "$var", "a\nb", "127.0.0.1/32 ; monitor"]
)
def test_nft_renderer_refuses_syntax_in_other_tokens(bad: str) -> None:
    with pytest.raises(UnsafeTextError):
        nft.render(_nft_ruleset(("ip daddr", bad, "counter", "return")))
    with pytest.raises(UnsafeTextError):
        nft.render(_nft_ruleset(("counter", "return"), chain=bad))


def test_nft_renderer_quotes_names_nft_would_read_as_syntax() -> None:
    text = nft.render(_nft_ruleset(("iifname", "counter", "counter", "return")))
    assert 'iifname "counter" counter return' in text
    text = nft.render(_nft_ruleset(("iifname", "!=eth0", "counter", "return")))
    assert 'iifname "!=eth0" counter return' in text
    text = nft.render(_nft_ruleset(("iifname", "veth+", "counter", "return")))
    assert 'iifname "veth*" counter return' in text


@pytest.mark.parametrize(
    "script",
    ['include "/etc/hostname"\n', "add table inet t\ninclude\n", "monitor\n", "define x = 1\n",
     "add table inet t # comment\n", 'add rule inet t c iifname "a\n', "add rule inet t c $x\n",
     'add rule inet t c iifname "x";include "y"\n'],
)  # fmt: skip
def test_nft_script_check_refuses_commands_outside_strings(script: str) -> None:
    with pytest.raises(UnsafeTextError):
        nft.check_script(script)


def test_nft_script_check_allows_words_inside_strings_and_names() -> None:
    script = 'add rule inet t c iifname "include" counter return\n'
    assert nft.check_script(script) == script
    # --cidr-sets names its sets after the flag they come from
    script = "add set inet istio-proxy-nat meshnet-include-ipv4 { type ipv4_addr; }\n"
    assert nft.check_script(script) == script
    with pytest.raises(UnsafeTextError):
        nft.check_script("add table inet t; include 'x'\n")


def test_restore_guard_refuses_unplanned_tables_and_stray_lines() -> None:
    planned = "* nat\n-N ISTIO_OUTPUT\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n"
    _check_restore_text(planned, {"nat"})
    with pytest.raises(BackendError, match="'filter'"):
        _check_restore_text(planned + "*filter\n-I INPUT -j DROP\nCOMMIT\n", {"nat"})
    for stray in ("* nat\nrm -rf /\nCOMMIT\n", "* nat\n-A X -j Y\rCOMMIT\n", "* nat\x00\n"):
        with pytest.raises(BackendError):
            _check_restore_text(stray, None)


# --- property: random text in every string option ----------------------------------------------

STRING_KEYS = sorted(
    f.key for f in ALL_FLAGS if f.kind == "str" and f.key not in ("network_namespace",)
)
SEEDS = ["", "*", "eth0", "10.0.0.0/8", "2001:db8::/32", "1337", "80,443", "192.0.2.53", "lo"]
hostile_text = st.one_of(
    st.text(max_size=24),
    st.text(alphabet="0123456789abcdef:./%,+*-!\"'; #\n{}", max_size=24),
    st.tuples(st.sampled_from(SEEDS), st.text(max_size=8)).map("".join),
)


def _model(ruleset: Any, family: Any) -> dict[str, dict[str, list[tuple[str, ...]]]]:
    return {
        table: {chain: [(chain, *r.spec) for r in rules] for chain, rules in chains.items()}
        for table, chains in ruleset.chains(family).items()
    }


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(STRING_KEYS), value=hostile_text, tproxy=st.booleans())
def test_random_text_in_any_option_is_refused_cleanly_or_round_trips(
    key: str, value: str, tproxy: bool
) -> None:
    given_flags: dict[str, str | None] = {"enable_ipv6": "true", key: value}
    if tproxy and key != "inbound_interception_mode":
        given_flags["inbound_interception_mode"] = "TPROXY"
    origin = next(f for f in ALL_FLAGS if f.key == key).origin()
    try:
        opts = options.build(options.gather(given_flags, {}), FakeSystem())
    except OptionError as err:
        assert "\n" not in str(err) and "\x00" not in str(err)
        assert origin in str(err), str(err)
        return
    ruleset = iptables.ruleset(opts)  # accepted: the texts must carry exactly the model
    blocks = restore_blocks(restore.render(ruleset))
    for family in ruleset.families():
        loaded = simulate_restore(blocks[family])
        expected = _model(ruleset, family)
        assert {t: {c: r for c, r in ch.items() if r} for t, ch in loaded.items()} == {
            t: {c: r for c, r in ch.items() if r} for t, ch in expected.items()
        }
    nft_plan = nftables.ruleset(opts)
    try:
        script = nft.render(nft_plan)
    except MeshnetError as err:  # never silently: only the unquotable
        assert isinstance(err, UnsafeTextError)
        return
    final = {
        t: {c: [nft.rule_text(r) for r in rules] for c, rules in chains.items()}
        for t, chains in nft_plan.chains().items()
    }
    assert simulate(script) == final
