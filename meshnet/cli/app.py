"""The `meshnet` command line in click: Istio's flags, short letters, help and usage errors.

`meshnet.entry` runs the plain command lines without click and sends the rest here. A usage
error (an unknown flag, a value click cannot parse) exits 255 as cobra's. Rules and results
go to stdout, logs to stderr.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from meshnet import logs
from meshnet.cli.argv import REPORT_OUTPUTS, report_output
from meshnet.config.flags import ENV_ONLY, EXTENSIONS, ISTIO_FLAGS, LOG_FLAGS, Flag

USAGE_EXIT = 255  # cobra's usage errors end in os.Exit(-1)
F = TypeVar("F", bound=Callable[..., Any])


def _help(flag: Flag) -> str:
    envs = ", ".join(f"${name}" for name in (flag.env, flag.alias_env) if name)
    notes = [f"env {envs}" if envs else "no env variable"]
    if flag.default:
        notes.append(f"default {flag.default!r}")
    return f"{flag.help} [{'; '.join(notes)}]"


def _option(flag: Flag) -> Callable[[F], F]:
    names = [n for n in (flag.short, flag.long) if n]
    if flag.kind == "bool":
        # pflag bools take `--flag` or `--flag=false`; click's optional value does the same.
        return click.option(
            *names,
            flag.key,
            is_flag=False,
            flag_value="true",
            default=None,
            metavar="[=BOOL]",
            help=_help(flag),
        )
    return click.option(*names, flag.key, default=None, metavar="TEXT", help=_help(flag))


def istio_flags(func: F) -> F:
    """Attach every istio-iptables flag, meshnet extension and logging flag to a command."""
    for flag in reversed(ISTIO_FLAGS + EXTENSIONS + LOG_FLAGS):
        func = _option(flag)(func)
    return func


_ENV_ONLY_HELP = "\b\nEnv-only options: " + ", ".join(
    f"${f.env} (default {f.default!r})" for f in ENV_ONLY
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(None, "-V", "--version", package_name="meshnet")
def cli() -> None:
    """meshnet: Istio-compatible sidecar traffic interception."""


@cli.command("istio-iptables", epilog=_ENV_ONLY_HELP)
@istio_flags
def istio_iptables(**given: str | None) -> None:
    """Plan and apply the sidecar's rules (drop-in for `pilot-agent istio-iptables`)."""
    from meshnet.cli.run import run_istio_iptables

    run_istio_iptables(given, os.environ)


@cli.command("clean", epilog=_ENV_ONLY_HELP)
@istio_flags
def clean(**given: str | None) -> None:
    """Remove everything Istio or meshnet installed, whatever flags are given.

    Every ISTIO_* chain and every jump into one (raw, mangle, nat, filter; IPv4 and IPv6;
    iptables-legacy and iptables-nft), meshnet's nftables tables and ipsets, the TPROXY
    `ip rule`s and routes, and ::6 on lo; other rules stay as they are. --dry-run prints the
    removal. `istio-iptables --cleanup-only` removes only what the given flags install.
    """
    from meshnet.cli.run import run_clean

    run_clean(given, os.environ)


@cli.command("istio-clean-iptables", epilog=_ENV_ONLY_HELP, hidden=True)
@istio_flags
def istio_clean_iptables(**given: str | None) -> None:
    """Alias of `meshnet clean` (Istio's removed istio-clean-iptables, which ignored flags)."""
    from meshnet.cli.run import run_clean

    run_clean(given, os.environ)


def _output_option() -> Callable[[F], F]:
    return click.option(
        "--output",
        "output",
        type=click.Choice(REPORT_OUTPUTS),
        default=None,
        help=f"{' or '.join(REPORT_OUTPUTS)} (default text); --output-format is an alias here.",
    )


def _output(output: str | None, given: dict[str, str | None]) -> str:
    """`--output`, or `--output-format` as its alias (for these commands it means the same)."""
    alias = given.pop("output_format", None)
    chosen = report_output(output, alias)
    if chosen is None:
        raise click.BadParameter(
            f"{alias!r} is not one of {', '.join(map(repr, REPORT_OUTPUTS))}.",
            param_hint="'--output-format'",
        )
    return chosen


@cli.command("verify", epilog=_ENV_ONLY_HELP)
@istio_flags
@_output_option()
def verify(output: str | None, **given: str | None) -> None:
    """Compare the live rules with the plan for these flags: exit 0 equal, 3 drifted.

    The report names the backend used per family (`--output json`: in_sync, backend,
    differences)."""
    from meshnet.cli.run import run_verify

    chosen = _output(output, given)
    sys.exit(run_verify(given, os.environ, chosen))


@cli.command("validate", epilog=_ENV_ONLY_HELP)
@istio_flags
def validate(**given: str | None) -> None:
    """Check that interception works, as istio-validation does (exit 126 when it does not)."""
    from meshnet.cli.run import run_validate

    run_validate(given, os.environ)


@cli.command("explain", epilog=_ENV_ONLY_HELP)
@istio_flags
@click.option(
    "--probe",
    "probes",
    multiple=True,
    required=True,
    metavar="SPEC",
    help="A connection to walk through the rules, e.g. 'out tcp uid=1000 "
    "dst=10.1.2.3:80' or 'in tcp dst=192.0.2.1:8080' (repeatable).",
)
@_output_option()
def explain(probes: tuple[str, ...], output: str | None, **given: str | None) -> None:
    """Show which rules a connection hits and whether it is captured (no root needed)."""
    from meshnet.cli.run import run_explain

    chosen = _output(output, given)
    run_explain(given, os.environ, probes, chosen)


@cli.group("cni")
def cni() -> None:
    """The sidecar-mode CNI plugin's node side."""


class _InstallCommand(click.Command):
    """`cni install --help` lists the installer's environment variables (its only options)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from meshnet.cni.install.settings import ENV_OPTIONS

        rows = [
            (o.name, o.help + (f" [default {o.default!r}]" if o.default else ""))
            for o in ENV_OPTIONS
        ]
        with formatter.section("Environment variables"):
            formatter.write_dl(rows)


@cni.command("install", cls=_InstallCommand, context_settings={"ignore_unknown_options": True})
def cni_install() -> None:
    """Install meshnet-cni on this node and keep it installed (options are environment
    variables, as Istio's install-cni)."""
    from meshnet.cni.install.main import main

    sys.exit(main([], os.environ))


@cni.command("agent")
def cni_agent() -> None:
    """Serve the meshnet-cni forwarder's calls on <CNI_AGENT_RUN_DIR>/meshnet-cni.sock until
    SIGTERM (options are env variables: CNI_AGENT_RUN_DIR, MESHNET_CNI_AGENT_WORKERS,
    MESHNET_CNI_AGENT_DEADLINE, MESHNET_LOG_LEVEL)."""
    from meshnet.cni import agent

    sys.exit(agent.main(os.environ))


@cli.command("demo")
def demo() -> None:
    """Show interception end to end in throw-away namespaces (needs root; leaves nothing)."""
    from meshnet.cli.demo import run

    run()


def dispatch(line: list[str]) -> int:
    """Parse `line` with click and run the command; the exit status (MeshnetError is left to
    `meshnet.entry.main`, which owns the exit codes)."""
    try:
        result = cli.main(args=line, prog_name="meshnet", standalone_mode=False)
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.exceptions.NoArgsIsHelpError as err:  # bare `meshnet`, `meshnet cni`
        click.echo(err.ctx.get_help() if err.ctx is not None else "")
        return 0
    except click.UsageError as err:
        hint = f"run '{err.ctx.command_path} --help' for usage" if err.ctx else None
        logs.get().error(err.format_message(), usage=hint)
        return USAGE_EXIT
    except click.Abort:
        logs.get().error("aborted")
        return 1
    return result if isinstance(result, int) else 0  # an int is ctx.exit's status
