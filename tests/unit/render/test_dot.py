"""`--output-format dot`: every chain is a node, every jump an edge, and Graphviz accepts it.

Rendering with Graphviz needs Debian's `graphviz` package (`dot`). Without it the rendering
tests skip locally and fail when CI=true, so CI cannot silently stop checking the syntax.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from typing import Any

import pytest

from meshnet.plan import iptables, ir, nftables
from meshnet.plan.model import Ruleset
from meshnet.plan.nftables import NftRuleset
from meshnet.render import dot
from tests.support.fakes import options_from_argv
from tests.support.goldens import CASES, STANDARD
from tests.support.repo import IN_CI

# The goldens' cases (standard, dual stack, TPROXY, DNS capture, DNS servers), plus one that
# reaches every target kind: DROP, MARK, CONNMARK, CT, TPROXY, REDIRECT :15053, RETURN, ACCEPT.
EVERYTHING = [
    *["-p", "15001", "-z", "15006", "-u", "1337", "-m", "TPROXY", "-i", "*", "-x", ""],
    *["-b", "*", "-d", "15090,15021,15020", "-c", "eth9", "-k", "veth0", "-q", "8080"],
    *["-o", "9090", "--redirect-dns", "--dns-servers", "10.96.0.10,2001:db8::53"],
    *["--drop-invalid", "--enable-ipv6", "true"],
]
DOT_CASES = {**CASES, "everything": EVERYTHING}
NAMES = sorted(DOT_CASES)

QUOTED = r'"(?:[^"\\]|\\.)*"'
EDGE = re.compile(rf"^\s*({QUOTED})(?::{QUOTED})?(?::\w+)?\s*->\s*({QUOTED})", re.MULTILINE)
NODE = re.compile(rf"^\s*({QUOTED})\s*\[", re.MULTILINE)
SVG = "{http://www.w3.org/2000/svg}"
XLINK_TITLE = "{http://www.w3.org/1999/xlink}title"
HOSTILE = 'q " a <b> c { p | b ! & \\ nl \n nul \x00 esc \x1b sep \u2028 sur \udc80 end\\'


def _unquote(token: str) -> str:
    # The renderer only ever writes \" and \\ inside a quoted string; JSON reads both the same.
    text: str = json.loads(token)
    return text


def _edges(text: str) -> Counter[tuple[str, str]]:
    return Counter((_unquote(tail), _unquote(head)) for tail, head in EDGE.findall(text))


def _nodes(text: str) -> set[str]:
    return {_unquote(node) for node in NODE.findall(text)}


def _graphviz() -> str:
    path = shutil.which("dot")
    if path is None:
        if IN_CI:
            pytest.fail("Graphviz `dot` is missing: apt-get install graphviz")
        pytest.skip("Graphviz `dot` is not installed (apt-get install graphviz)")
    return path


def _run_dot(text: str, fmt: str) -> str:
    done = subprocess.run(
        [_graphviz(), f"-T{fmt}"],
        input=text.encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    stderr = done.stderr.decode(errors="replace")
    assert done.returncode == 0, stderr
    assert "error" not in stderr.lower() and "warning" not in stderr.lower(), stderr
    return done.stdout.decode()


def _drawn_graph(svg: str) -> tuple[set[str], int]:
    """The nodes Graphviz drew (their ids, from each node's SVG <title>) and how many edges."""
    groups = [g for g in ET.fromstring(svg).iter(f"{SVG}g") if g.get("class") in ("node", "edge")]
    nodes = {g.findtext(f"{SVG}title", "") for g in groups if g.get("class") == "node"}
    return nodes, sum(g.get("class") == "edge" for g in groups)


def _drawn_texts(graph: dict[str, Any]) -> list[str]:
    """Every text Graphviz drew for a node (its label's `T` operations), from `dot -Tjson`."""
    return [
        op["text"]
        for obj in graph.get("objects", [])
        for op in obj.get("_ldraw_", [])
        if op["op"] == "T"
    ]


# --- iptables ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_chain_is_a_node(name: str) -> None:
    ruleset = iptables.ruleset(options_from_argv(DOT_CASES[name]))
    nodes = _nodes(dot.render(ruleset))
    for family in ruleset.families():
        declared = ruleset.user_chains(family)
        for table, chains in ruleset.chains(family).items():
            for chain in [*chains, *declared.get(table, [])]:
                assert f"{family}/{table}/{chain}" in nodes


@pytest.mark.parametrize("name", NAMES)
def test_every_jump_is_one_edge(name: str) -> None:
    ruleset = iptables.ruleset(options_from_argv(DOT_CASES[name]))
    expected: Counter[tuple[str, str]] = Counter()
    for family in ruleset.families():
        declared = ruleset.user_chains(family)
        for rule in ruleset.rules(family):
            if rule.jump_chain in declared.get(rule.table, []):
                prefix = f"{family}/{rule.table}"
                expected[(f"{prefix}/{rule.chain}", f"{prefix}/{rule.jump_chain}")] += 1
    jumps = Counter(
        {edge: n for edge, n in _edges(dot.render(ruleset)).items() if "=>" not in edge[1]}
    )
    assert jumps == expected


def test_outbound_capture_path_reads_from_hook_to_redirect() -> None:
    text = dot.render(iptables.ruleset(options_from_argv([*STANDARD, "--enable-ipv6", "false"])))
    edges = set(_edges(text))
    path = ["OUTPUT", "ISTIO_OUTPUT", "ISTIO_REDIRECT", "=> REDIRECT :15001"]
    for tail, head in itertools.pairwise(path):
        assert (f"ipv4/nat/{tail}", f"ipv4/nat/{head}") in edges
    assert "<B>nat OUTPUT</B>" in text


def test_match_and_target_are_summarised() -> None:
    text = dot.render(iptables.ruleset(options_from_argv(EVERYTHING)))
    assert "out lo, dst != 127.0.0.1/32, tcp, dports != 53,15008, uid 1337" in text
    assert "TPROXY :15006 mark 1337/0xffffffff" in text
    assert "CONNMARK save-mark" in text and "CT zone 2" in text


@pytest.mark.parametrize(
    ("target", "kind"),
    [
        ("REDIRECT :15001", "intercept"),
        ("REDIRECT :15053", "intercept"),
        ("TPROXY :15006 mark 1337/0xffffffff", "intercept"),
        ("RETURN", "pass"),
        ("ACCEPT", "pass"),
        ("DROP", "drop"),
        ("MARK set-mark 1337", "mark"),
        ("CONNMARK restore-mark", "mark"),
        ("CT zone 1", "mark"),
        ("ISTIO_OUTPUT", "chain"),
    ],
)
def test_target_kinds_are_coloured_distinctly(target: str, kind: dot.Kind) -> None:
    text = dot.render(iptables.ruleset(options_from_argv(EVERYTHING)))
    cell = f'BGCOLOR="{dot._KIND_COLORS[kind]}"><FONT FACE="monospace">{target}</FONT>'
    assert cell in text
    assert len(set(dot._KIND_COLORS.values())) == len(dot._KIND_COLORS)


def test_output_is_deterministic() -> None:
    first = dot.render(iptables.ruleset(options_from_argv(EVERYTHING)))
    assert dot.render(iptables.ruleset(options_from_argv(EVERYTHING))) == first


@pytest.mark.parametrize("name", NAMES)
def test_graphviz_renders_the_plan(name: str) -> None:
    text = dot.render(iptables.ruleset(options_from_argv(DOT_CASES[name])))
    assert _drawn_graph(_run_dot(text, "svg")) == (_nodes(text), _edges(text).total())


# --- nftables ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_nft_every_chain_is_a_node_and_every_jump_an_edge(name: str) -> None:
    ruleset = nftables.ruleset(options_from_argv(DOT_CASES[name]))
    text = dot.render_nft(ruleset)
    chains = ruleset.chains()
    nodes = _nodes(text)
    expected: Counter[tuple[str, str]] = Counter()
    for table, table_chains in chains.items():
        for chain, rules in table_chains.items():
            assert f"inet/{table}/{chain}" in nodes
            for rule in rules:
                tokens = rule.text.split()
                if "jump" in tokens:
                    target = tokens[tokens.index("jump") + 1]
                    expected[(f"inet/{table}/{chain}", f"inet/{table}/{target}")] += 1
    jumps = Counter({edge: n for edge, n in _edges(text).items() if "=>" not in edge[1]})
    assert jumps == expected and expected


def test_nft_capture_path_and_base_chain_spec() -> None:
    text = dot.render_nft(
        nftables.ruleset(options_from_argv([*STANDARD, "--enable-ipv6", "false"]))
    )
    edges = set(_edges(text))
    path = ["output", "istio-output", "istio-redirect", "=> redirect to :15001"]
    for tail, head in itertools.pairwise(path):
        assert (f"inet/istio-proxy-nat/{tail}", f"inet/istio-proxy-nat/{head}") in edges
    assert "type nat hook output priority -100" in text


@pytest.mark.parametrize("name", NAMES)
def test_graphviz_renders_the_nft_plan(name: str) -> None:
    text = dot.render_nft(nftables.ruleset(options_from_argv(DOT_CASES[name])))
    assert _drawn_graph(_run_dot(text, "svg")) == (_nodes(text), _edges(text).total())


# --- hostile text -----------------------------------------------------------------------


def _hostile_rules() -> tuple[ir.Rule, ir.Rule]:
    """Two planned rules whose every free text is hostile (chain, interface, port, reason)."""
    chain = 'ISTIO_"X<>{|}'
    return (
        ir.Rule("nat", "OUTPUT", (ir.oif('e"th<0>{|}!&\\'),), ir.jump(chain), HOSTILE),
        ir.Rule("nat", chain, (ir.iif(HOSTILE),), ir.redirect(HOSTILE), HOSTILE),
    )


def _hostile_ruleset() -> Ruleset:
    return iptables.lower(ir.Plan(_hostile_rules(), ipv6_enabled=False))


def _hostile_nft() -> NftRuleset:
    return nftables.lower(ir.Plan(_hostile_rules(), ipv6_enabled=True))


def test_hostile_text_is_escaped_and_cannot_break_the_syntax() -> None:
    text = dot.render(_hostile_ruleset())
    assert "\n nul" not in text and "\x00" not in text and "\udc80" not in text
    text.encode()  # lone surrogates would make the output unprintable
    assert _edges(text) == Counter(
        {
            ("ipv4/nat/OUTPUT", 'ipv4/nat/ISTIO_"X<>{|}'): 1,
            ('ipv4/nat/ISTIO_"X<>{|}', f"ipv4/nat/=> REDIRECT :{dot._printable(HOSTILE)}"): 1,
        }
    )


def test_graphviz_reads_hostile_text_back_verbatim() -> None:
    drawings = (
        (dot.render(_hostile_ruleset()), "out"),
        (dot.render_nft(_hostile_nft()), "oifname"),
    )
    for text, out in drawings:
        drawn = _drawn_texts(json.loads(_run_dot(text, "json")))
        # Each label cell came out whole: nothing ended a string or a tag early.
        assert drawn.count(dot._printable(HOSTILE)) == 2
        assert f'{out} e"th<0>{{|}}!&\\' in drawn
        svg = ET.fromstring(_run_dot(text, "svg"))
        tooltips = [a.get(XLINK_TITLE, "") for a in svg.iter(f"{SVG}a")]
        assert len(tooltips) == 2 and all(dot._printable(HOSTILE) in t for t in tooltips)
