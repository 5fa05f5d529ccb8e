"""The nft transaction text, exactly as Istio logs it: knftables v0.0.21 `tx.String()`.

One operation per line, in transaction order. This is also what `nft -f -` reads, so the same
text is printed by a dry run and piped to nft by the backend.

nft reads a script, not arguments: `;` or a newline starts a new command (`include "..."` reads
a file, `monitor` never ends), `#` comments out the rest of a line, `!=` negates a match. So
the text is built so that data cannot become syntax: interface names are nft strings (quoted
unless they are plain words, as Istio prints `eth0`), every other token is limited to the
characters the plan's own tokens use, and `check_script` refuses any script with a command
word or comment outside a quoted string. What cannot be written safely raises UnsafeTextError.
"""

from __future__ import annotations

import re

from meshnet.errors import UnsafeTextError
from meshnet.plan.nftables import NftChain, NftRule, NftRuleset, NftSet, NftTable

FAMILY = "inet"  # every Istio table is inet: one rule serves IPv4 and IPv6
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")  # table, chain and set names
_TOKEN = re.compile(r"[A-Za-z0-9_ .:/!=,{}@-]+")  # every other token of a planned rule
# Interface names nft reads as the same string unquoted (the goldens' `eth0`, `not-istio-nic`);
# a bare nft keyword (`counter`) would not be, so anything else is quoted.
_BARE = re.compile(r"lo|[a-z]+[0-9]+|[a-z0-9]+(?:-[a-z0-9]+)+")
_STRING_BAD = re.compile(r"[\"\\*\x00-\x1f\x7f-\x9f]")
_INTERFACE_KEYS = ("iifname", "oifname")
# Top-level nft commands that read files, define variables or never end: never from data.
# A word only where it stands alone: `meshnet-include-ipv4` is a set name, not a command.
_COMMAND_WORDS = re.compile(
    r"(?<![\w.@-])(?:include|define|redefine|undefine|monitor|import|export)(?![\w.@-])"
)


def check_script(text: str) -> str:
    """`text`, after checking that outside quoted strings it has no `#`, `$` or command word
    from the list above, and that every quoted string ends on its line; else UnsafeTextError."""
    for number, line in enumerate(text.split("\n"), 1):
        parts = line.split('"')
        if len(parts) % 2 == 0:
            raise UnsafeTextError(f"nft script line {number}: unterminated quoted string")
        outside = " ".join(parts[0::2])
        found = _COMMAND_WORDS.search(outside) or re.search(r"[#$\\]", outside)
        if found:
            raise UnsafeTextError(f"nft script line {number}: refusing {found.group(0)!r}")
    return text


def nft_string(text: str) -> str:
    """An interface name as nft reads it: bare, or quoted (an iptables `+` wildcard becomes
    nft's `*`); UnsafeTextError when it cannot be quoted (a quote, `\\`, `*`, control char)."""
    if _BARE.fullmatch(text):
        return text
    body = text[:-1] if text.endswith("+") and len(text) > 1 else text
    if not body or _STRING_BAD.search(body) or not body.isprintable():
        raise UnsafeTextError(f"refusing to write {text!r} as an nft string")
    return f'"{body}*"' if body != text else f'"{body}"'


def _name(text: str) -> str:
    if not _NAME.fullmatch(text):
        raise UnsafeTextError(f"refusing {text!r} as an nft table, chain or set name")
    return text


def rule_text(rule: NftRule) -> str:
    """The rule body (`NftRule.text`) with interface names as nft strings, all tokens checked."""
    out: list[str] = []
    for index, part in enumerate(rule.spec):
        if index and rule.spec[index - 1] in _INTERFACE_KEYS:
            out.append(nft_string(part))
        elif _TOKEN.fullmatch(part):
            out.append(part)
        else:
            raise UnsafeTextError(f"refusing to write {part!r} into an nft rule")
    return " ".join(out)


def render(ruleset: NftRuleset) -> str:
    """The whole transaction; empty when it has no operations."""
    lines = [line for table in ruleset.tables for line in table_lines(table)]
    return check_script("".join(f"{line}\n" for line in lines))


def table_lines(table: NftTable) -> list[str]:
    """One table's operations: rebuild (add, flush, chains, rules) or delete (add, delete)."""
    head = f"{FAMILY} {_name(table.name)}"
    if table.action == "delete":
        # Adding first makes the delete succeed whether or not the table exists.
        return [f"add table {head}", f"delete table {head}"]
    lines = [f"add table {head}", f"flush table {head}"]
    lines += [f"add chain {head} {chain_declaration(chain)}" for chain in table.chains]
    for named in table.sets:  # meshnet's --cidr-sets only; declared before the rules use them
        lines += set_lines(head, named)
    lines += [rule_line(rule) for rule in table.rules]
    return lines


def set_lines(head: str, named: NftSet) -> list[str]:
    """An interval set (auto-merge: overlapping CIDRs are fine) and its elements."""
    name, kind = _name(named.name), _name(named.type)
    members = [_member(m) for m in named.members]
    return [
        f"add set {head} {name} {{ type {kind} ; flags interval ; auto-merge ; }}",
        f"add element {head} {name} {{ {', '.join(members)} }}",
    ]


def _member(text: str) -> str:
    if not re.fullmatch(r"[0-9A-Fa-f.:/]+", text):
        raise UnsafeTextError(f"refusing {text!r} as an nft set element")
    return text


def chain_declaration(chain: NftChain) -> str:
    """`name`, or for a base chain `name { type T hook H priority N ; }` (knftables' spacing)."""
    name = _name(chain.name)
    if not chain.is_base:
        return name
    kind, hook, priority = _name(str(chain.type)), _name(str(chain.hook)), int(chain.priority or 0)
    return f"{name} {{ type {kind} hook {hook} priority {priority} ; }}"


def rule_line(rule: NftRule) -> str:
    """`add rule inet T C <rule>` or `insert rule inet T C index N <rule>`."""
    where = f"{FAMILY} {_name(rule.table)} {_name(rule.chain)}"
    if rule.index is None:
        return f"add rule {where} {rule_text(rule)}"
    return f"insert rule {where} index {int(rule.index)} {rule_text(rule)}"
