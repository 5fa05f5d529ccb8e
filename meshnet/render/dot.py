"""`--output-format dot`: the plan as a Graphviz picture of hooks, chains and jumps.

Layout: one cluster per address family (iptables; nftables has a single `inet` one), one cluster
per table inside it, tables in the order a packet meets them (raw, mangle, nat, filter). Every
chain is a node whose label is a table of its rules in final order: number, match summary,
target, reason. Hooks (built-in or base chains) are titled with their table, e.g. "nat OUTPUT".

Every jump to a user chain is an edge leaving its rule's row, and interception verdicts
(REDIRECT, TPROXY) end in a node of their own, so a capture path reads as a line of arrows:
OUTPUT → ISTIO_OUTPUT → ISTIO_REDIRECT → REDIRECT :15001. Other targets (RETURN/ACCEPT, DROP,
MARK/CONNMARK/CT) are coloured by kind in their cell, as the legend says; they get no edge
because a RETURN arrow from every exclusion rule would bury the jumps.

All text that comes from the plan (reasons, interface names, CIDRs) goes through `_quote` or
`_html`, so no value can end a string or a label early. Output is deterministic: it follows the
model's order and nothing else. Stdlib only.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from meshnet.plan import iptables, ir
from meshnet.plan.model import HOOKS, Family, Rule, Ruleset

if TYPE_CHECKING:  # types only: the iptables dry run should not import the nft lowering
    from meshnet.plan.nftables import NftChain, NftRule, NftRuleset, NftTable

Kind = Literal["chain", "intercept", "pass", "drop", "mark", "other"]

_PACKET_ORDER: tuple[str, ...] = ("raw", "mangle", "nat", "filter")  # netfilter priority order

_HOOK_COLOR = "#f6d365"
_CHAIN_COLOR = "#cfe2f3"
_KIND_COLORS: dict[Kind, str] = {
    "chain": _CHAIN_COLOR,
    "intercept": "#f9b66d",
    "pass": "#d9ead3",
    "drop": "#f4a6a6",
    "mark": "#dccbf0",
    "other": "#ffffff",
}
_TABLE_OPEN = (
    '<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0" CELLPADDING="3" COLOR="#888888" '
    'BGCOLOR="white">'
)
_EDGE_COLORS: dict[Kind, str] = {"chain": "#3465a4", "intercept": "#c4661f"}
_LEGEND: tuple[tuple[str, str], ...] = (
    (_HOOK_COLOR, "hook: built-in or base chain"),
    (_CHAIN_COLOR, "jump to a user chain (arrow)"),
    (_KIND_COLORS["intercept"], "interception: REDIRECT, TPROXY (arrow to its own node)"),
    (_KIND_COLORS["pass"], "RETURN / ACCEPT: not captured here"),
    (_KIND_COLORS["drop"], "DROP"),
    (_KIND_COLORS["mark"], "MARK / CONNMARK / CT: sets state, packet goes on"),
)

# How each target kind of the plan is coloured.
_KINDS: dict[str, Kind] = {
    "jump": "chain",
    "redirect": "intercept",
    "tproxy": "intercept",
    "return": "pass",
    "accept": "pass",
    "drop": "drop",
    "set-mark": "mark",
    "save-mark": "mark",
    "restore-mark": "mark",
    "zone": "mark",
}
# How an iptables match reads in the summary: `out lo, dst != 127.0.0.1/32, uid 1337`.
_MATCH_WORDS: dict[str, str] = {"src": "src", "dst": "dst", "iif": "in", "oif": "out"}
_MATCH_WORDS |= {"uid": "uid", "gid": "gid", "mark": "mark", "connmark": "connmark"}


@dataclass(frozen=True, slots=True)
class _Row:
    """One rule as drawn: match summary, target, its kind, why, and the chain it jumps to."""

    match: str
    target: str
    kind: Kind
    reason: str
    text: str  # the whole rule, for the edge tooltip
    jump: str | None = None


@dataclass(frozen=True, slots=True)
class _Chain:
    name: str
    title: str
    caption: str | None  # set for hooks: "hook", or the nft base chain spec
    rows: tuple[_Row, ...]


@dataclass(frozen=True, slots=True)
class _Table:
    name: str
    label: str
    chains: tuple[_Chain, ...]


@dataclass(frozen=True, slots=True)
class _Family:
    name: str
    tables: tuple[_Table, ...]


# --- public API ---------------------------------------------------------------------------


def render(ruleset: Ruleset) -> str:
    """The iptables plan: a cluster per family, per table, a node per chain."""
    families = tuple(_iptables_family(ruleset, family) for family in ruleset.families())
    return _digraph("meshnet plan (iptables)", families)


def render_nft(ruleset: NftRuleset) -> str:
    """The native nftables plan: one `inet` cluster, a cluster per table, a node per chain."""
    chains = ruleset.chains()
    # Packet order, like iptables: raw (-300), mangle (-150), nat (-100); stable on ties.
    tables = sorted((t for t in ruleset.tables if t.name in chains), key=_nft_priority)
    family = _Family("inet", tuple(_nft_table(t, chains[t.name]) for t in tables))
    return _digraph("meshnet plan (nftables)", (family,))


# --- iptables model → drawing ---------------------------------------------------------------


def _iptables_family(ruleset: Ruleset, family: Family) -> _Family:
    chains = ruleset.chains(family)
    declared = ruleset.user_chains(family)
    names = sorted(set(chains) | set(declared), key=_table_rank)
    tables = (_iptables_table(t, chains.get(t, {}), declared.get(t, [])) for t in names)
    return _Family(family, tuple(tables))


def _table_rank(table: str) -> tuple[int, str]:
    rank = _PACKET_ORDER.index(table) if table in _PACKET_ORDER else len(_PACKET_ORDER)
    return rank, table


def _iptables_table(table: str, chains: dict[str, list[Rule]], declared: list[str]) -> _Table:
    hooks = sorted((c for c in chains if c in HOOKS), key=HOOKS.index)
    # Declared chains include bare jump targets without rules; anything else is kept too.
    rest = [c for c in chains if c not in HOOKS and c not in declared]
    user = frozenset([*declared, *rest])
    nodes = []
    for name in [*hooks, *declared, *rest]:
        rows = tuple(_iptables_row(rule, user) for rule in chains.get(name, []))
        if name in HOOKS:
            nodes.append(_Chain(name, f"{table} {name}", "hook", rows))
        else:
            nodes.append(_Chain(name, name, None, rows))
    return _Table(table, f"table {table}", tuple(nodes))


def _iptables_row(rule: Rule, user_chains: Collection[str]) -> _Row:
    source = ir.planned(rule.source)
    target = source.target
    jump = target.chain if target.kind == "jump" and target.chain in user_chains else None
    kind: Kind = "chain" if jump else _KINDS[target.kind]
    summary = ", ".join(_summary(m) for m in iptables.effective(source.matches)) or "*"
    text = " ".join(rule.append_form())
    return _Row(summary, _iptables_target(target), kind, rule.reason, text, jump)


def _summary(m: ir.Match) -> str:
    """One match in short, as iptables writes it without its option syntax."""
    bang = "!= " if m.negated else ""
    if m.kind == "proto":
        return f"!{m.value}" if m.negated else m.value
    if m.kind == "dst-set":
        return f"set {m.value} dst"
    if m.kind in ("sport", "dport"):
        plural = "s" if len(m.values) > 1 else ""
        return f"{m.kind}{plural} {bang}{','.join(m.values)}"
    if m.kind == "ctstate":
        return f"ct {','.join(m.values).upper()}"
    return f"{_MATCH_WORDS.get(m.kind, m.kind)} {bang}{m.value}"


def _iptables_target(target: ir.Target) -> str:
    """`REDIRECT :15001`, `TPROXY :15006 mark 1337/0xffffffff`, `MARK set-mark 1338`, ..."""
    simple = {"return": "RETURN", "accept": "ACCEPT", "drop": "DROP"}
    simple |= {"save-mark": "CONNMARK save-mark", "restore-mark": "CONNMARK restore-mark"}
    if target.kind in simple:
        return simple[target.kind]
    if target.kind == "redirect":
        return f"REDIRECT :{target.port}"
    if target.kind == "tproxy":
        return f"TPROXY :{target.port} mark {target.mark}/0xffffffff"
    if target.kind == "set-mark":
        return f"MARK set-mark {target.mark}"
    if target.kind == "zone":
        return f"CT zone {target.zone}"
    return target.chain


# --- nftables model → drawing ---------------------------------------------------------------


def _nft_priority(table: NftTable) -> int:
    return min((c.priority for c in table.chains if c.priority is not None), default=0)


def _nft_table(table: NftTable, chains: dict[str, list[NftRule]]) -> _Table:
    specs = {chain.name: chain for chain in table.chains}
    base = [name for name in chains if name in specs and specs[name].is_base]
    user = [name for name in chains if name not in base]
    nodes = []
    for name in [*base, *user]:
        rows = tuple(_nft_row(rule, user) for rule in chains[name])
        spec = specs.get(name)
        if name in base and spec is not None:
            nodes.append(_Chain(name, f"{table.name} {name}", _base_caption(spec), rows))
        else:
            nodes.append(_Chain(name, name, None, rows))
    return _Table(table.name, f"table inet {table.name}", tuple(nodes))


def _base_caption(chain: NftChain) -> str:
    return f"type {chain.type} hook {chain.hook} priority {chain.priority}"


def _nft_row(rule: NftRule, user_chains: Collection[str]) -> _Row:
    from meshnet.plan import nftables  # only for the nft plan

    source = ir.planned(rule.source)
    matched, verdict = nftables.parts(source)
    target = source.target
    chain = nftables.chain_name(target.chain) if target.kind == "jump" else None
    jump = chain if chain in user_chains else None
    kind: Kind = "chain" if jump else _KINDS[target.kind]
    statement = " ".join(word for word in verdict if word != "counter")
    return _Row(" ".join(matched) or "*", statement, kind, rule.reason, rule.text, jump)


# --- DOT text -------------------------------------------------------------------------------


def _digraph(title: str, families: Iterable[_Family]) -> str:
    lines = [
        "digraph meshnet {",
        f"  graph [rankdir=LR, labelloc=t, fontname=Helvetica, fontsize=14, "
        f"nodesep=0.25, ranksep=0.7, label={_quote(title)}];",
        "  node [shape=plaintext, margin=0, fontname=Helvetica, fontsize=10];",
        "  edge [fontname=Helvetica, fontsize=9, arrowsize=0.7];",
    ]
    for family in families:
        lines += _family_lines(family)
    lines += _legend_lines()
    lines.append("}")
    return "\n".join(lines) + "\n"


def _family_lines(family: _Family) -> list[str]:
    lines = [
        f"  subgraph {_quote('cluster_' + family.name)} {{",
        f'    label={_quote(family.name)}; style=rounded; color="#888888";',
    ]
    for table in family.tables:
        lines += _table_lines(family.name, table)
    lines.append("  }")
    return lines


def _table_lines(family: str, table: _Table) -> list[str]:
    prefix = f"{family}/{table.name}"
    lines = [
        f"    subgraph {_quote(f'cluster_{family}_{table.name}')} {{",
        f'      label={_quote(table.label)}; style="rounded,filled"; fillcolor="#f7f7f7"; '
        'color="#bbbbbb";',
    ]
    for chain in table.chains:
        lines.append(f"      {_quote(f'{prefix}/{chain.name}')} [label=<{_chain_label(chain)}>];")
    terminals: dict[str, str] = {}  # node id -> label, in first-seen order
    edges = [edge for chain in table.chains for edge in _edges(prefix, chain, terminals)]
    lines += [_terminal_line(node, label) for node, label in terminals.items()]
    lines += edges
    lines.append("    }")
    return lines


def _edges(prefix: str, chain: _Chain, terminals: dict[str, str]) -> list[str]:
    """One edge per jump and per interception verdict, leaving from the rule's row."""
    edges = []
    for number, row in enumerate(chain.rows, start=1):
        if row.jump is not None:
            head = f"{prefix}/{row.jump}"
        elif row.kind == "intercept":
            head = f"{prefix}/=> {row.target}"
            terminals.setdefault(head, row.target)
        else:
            continue
        tail = f'{_quote(f"{prefix}/{chain.name}")}:"r{number}":e'
        tooltip = _quote(f"{row.text}  ({row.reason})")
        color = _EDGE_COLORS[row.kind]
        edges.append(f'      {tail} -> {_quote(head)}:w [color="{color}", tooltip={tooltip}];')
    return edges


def _terminal_line(node: str, label: str) -> str:
    color = _KIND_COLORS["intercept"]
    return (
        f"      {_quote(node)} [label={_quote(label)}, shape=box, "
        f'style="rounded,filled,bold", fillcolor="{color}", margin="0.15,0.08"];'
    )


def _chain_label(chain: _Chain) -> str:
    """An HTML-like table: header (title, caption), then one row per rule, one line each."""
    color = _HOOK_COLOR if chain.caption is not None else _CHAIN_COLOR
    header = f"<B>{_html(chain.title)}</B>"
    if chain.caption is not None:
        header += f'<BR/><FONT POINT-SIZE="8">{_html(chain.caption)}</FONT>'
    rows = [f'<TR><TD COLSPAN="4" BGCOLOR="{color}">{header}</TD></TR>']
    rows += [_row_cells(number, row) for number, row in enumerate(chain.rows, start=1)]
    if not chain.rows:
        rows.append('<TR><TD COLSPAN="4"><I>no rules</I></TD></TR>')
    return _TABLE_OPEN + "".join(f"\n        {row}" for row in rows) + "\n        </TABLE>"


def _row_cells(number: int, row: _Row) -> str:
    # The port sits on the last cell so that the edge leaves from the row's right end.
    return (
        f'<TR><TD ALIGN="RIGHT">{number}</TD>'
        f'<TD ALIGN="LEFT"><FONT FACE="monospace">{_html(row.match)}</FONT></TD>'
        f'<TD ALIGN="LEFT" BGCOLOR="{_KIND_COLORS[row.kind]}">'
        f'<FONT FACE="monospace">{_html(row.target)}</FONT></TD>'
        f'<TD ALIGN="LEFT" PORT="r{number}">'
        f'<FONT POINT-SIZE="8" COLOR="#555555">{_html(row.reason)}</FONT></TD></TR>'
    )


def _legend_lines() -> list[str]:
    rows = "".join(
        f'<TR><TD BGCOLOR="{color}" WIDTH="18"></TD><TD ALIGN="LEFT">{_html(text)}</TD></TR>'
        for color, text in _LEGEND
    )
    table = f"{_TABLE_OPEN}{rows}</TABLE>"
    return [
        '  subgraph "cluster_legend" {',
        '    label="legend"; style=rounded; color="#bbbbbb";',
        f'    "legend" [label=<{table}>];',
        "  }",
    ]


# --- escaping -------------------------------------------------------------------------------


# What html.escape does, without importing html (and html.entities) for five characters.
_HTML_ENTITIES = str.maketrans(
    {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#x27;"}
)


def _printable(text: str) -> str:
    """Control characters, line breaks and lone surrogates (undecodable argv bytes) would end
    a DOT string or break the UTF-8 output: show them as `\\xNN` / `\\uNNNN` text instead."""
    return "".join(char if char.isprintable() else _escaped(char) for char in text)


def _escaped(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _quote(text: str) -> str:
    """A DOT double-quoted string (IDs, plain labels, tooltips)."""
    return '"' + _printable(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _html(text: str) -> str:
    """Text inside an HTML-like label: `&`, `<`, `>` and quotes as entities."""
    return _printable(text).translate(_HTML_ENTITIES)
