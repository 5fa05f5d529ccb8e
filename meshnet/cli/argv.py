"""Reading a command's flags without click, for the commands an init container runs.

Importing click costs an init container more than its whole rule work, so `meshnet.entry`
reads the plain forms here and hands everything else to click (help, --version, unknown
flags, positional arguments, attached short values, a bool flag followed by a word). Where
this reader answers, it answers what click would: the same `given` map, last occurrence
winning, a value-taking flag consuming the next argument whatever it looks like, and a bool
flag alone meaning "true" (click's optional-value rule).
"""

from __future__ import annotations

from collections.abc import Sequence

from meshnet.config.flags import EXTENSIONS, ISTIO_FLAGS, LOG_FLAGS, Flag

__all__ = ["REPORT_OUTPUTS", "parse", "report_output"]

REPORT_OUTPUTS = ("text", "json")  # `--output` of verify and explain

_FLAGS: tuple[Flag, ...] = ISTIO_FLAGS + EXTENSIONS + LOG_FLAGS
_BY_NAME: dict[str, Flag] = {
    name: flag for flag in _FLAGS for name in (flag.long, flag.short) if name is not None
}


def parse(args: Sequence[str], extra: Sequence[str] = ()) -> dict[str, str | None] | None:
    """The `given` map click would build from `args` (every flag key; None when absent), or
    None when `args` holds anything this reader leaves to click. `extra`: the command's own
    value-taking long flags ("--output" gives the key "output")."""
    own = {name: Flag(name[2:].replace("-", "_"), name) for name in extra}
    given: dict[str, str | None] = {flag.key: None for flag in (*_FLAGS, *own.values())}
    index = 0
    while index < len(args):
        name, attached = _split(args[index])
        flag = own.get(name) or _BY_NAME.get(name)
        if flag is None:
            return None  # not a flag, or `-p=1` / `-p1` (click would keep "=1" / "1")
        index += 1
        if attached is not None:
            if flag.kind == "bool" and _looks_like_option(attached):
                return None  # click: `--dry-run=-x` is "true", then -x is read as a flag
            given[flag.key] = attached
        elif flag.kind != "bool":
            if index == len(args):
                return None  # click's "requires an argument" usage error
            given[flag.key] = args[index]
            index += 1
        elif index == len(args) or _looks_like_option(args[index]):
            given[flag.key] = "true"
        else:
            return None  # click would take the next word as the bool's value
    return given


def _split(arg: str) -> tuple[str, str | None]:
    if arg.startswith("--") and "=" in arg:
        name, value = arg.split("=", 1)
        return name, value
    return arg, None


def _looks_like_option(arg: str) -> bool:
    return arg.startswith("-") and len(arg) > 1


def report_output(output: str | None, alias: str | None) -> str | None:
    """verify's and explain's output: `--output`, else `--output-format` (its alias for these
    commands), else "text"; None when the one chosen is not in REPORT_OUTPUTS."""
    chosen = output if output is not None else alias
    if chosen is None:
        return "text"
    return chosen if chosen in REPORT_OUTPUTS else None
