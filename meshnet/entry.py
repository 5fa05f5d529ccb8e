"""The `meshnet` executable: exit codes, early log format, and the click-free start.

Exit codes follow istio-iptables: 0 ok, 1 error, 126 validation failed, 255 usage error.
`istio-iptables`, `clean`, `verify` and `validate` in their plain forms (see `meshnet.cli.argv`)
run without importing click, which costs an init container more than its rule work; every
other command line, and every line `meshnet.cli.argv` leaves alone, goes to `meshnet.cli.app`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence

from meshnet import logs
from meshnet.cli import argv
from meshnet.errors import MeshnetError

__all__ = ["main"]

_JSON_FLAGS = ("--log_as_json", "--log_as_json=true", "--log_as_json=1", "--log-format=json")


def main(args: Sequence[str] | None = None) -> None:
    """Run one command line and exit with its status."""
    line = list(sys.argv[1:] if args is None else args)
    logs.configure(log_format_early(line, os.environ))
    try:
        command = _plain_command(line)
        if command is not None:
            status = command()
        else:
            from meshnet.cli import app

            status = app.dispatch(line)
    except MeshnetError as err:
        logs.get().error(str(err))
        sys.exit(err.exit_code)
    sys.exit(status)


def _plain_command(line: list[str]) -> Callable[[], int] | None:
    """The command to run without click, or None when click must read `line`."""
    name, rest = (line[0], line[1:]) if line else ("", [])
    if name == "verify":
        return _plain_verify(rest)
    if name not in ("istio-iptables", "clean", "istio-clean-iptables", "validate"):
        return None
    given = argv.parse(rest)
    if given is None:
        return None
    from meshnet.cli import run

    runs = {"istio-iptables": run.run_istio_iptables, "validate": run.run_validate}
    chosen = runs.get(name, run.run_clean)
    return lambda: chosen(given, os.environ) or 0


def _plain_verify(rest: list[str]) -> Callable[[], int] | None:
    given = argv.parse(rest, extra=("--output",))
    if given is None:
        return None
    chosen = argv.report_output(given.pop("output"), given.pop("output_format"))
    if chosen is None:
        return None  # a bad choice gets click's error
    from meshnet.cli import run

    return lambda: run.run_verify(given, os.environ, chosen)


def log_format_early(line: list[str], environ: Mapping[str, str]) -> str:
    """The error format before (or without) option parsing: a usage error, or a bad value,
    is reported in the format the command line asks for, wherever the flag is."""
    fmt = "json" if environ.get("MESHNET_LOG_FORMAT") == "json" else "text"
    for i, arg in enumerate(line):
        if arg == "--":
            break
        if arg in _JSON_FLAGS or (arg == "--log-format" and line[i + 1 : i + 2] == ["json"]):
            fmt = "json"
        elif arg == "--log-format=text" or (
            arg == "--log-format" and line[i + 1 : i + 2] == ["text"]
        ):
            fmt = "text"
    return fmt
