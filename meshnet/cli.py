"""The `meshnet` command line: Istio's flags, short letters, env variables and exit codes.

Exit codes follow istio-iptables: 0 ok, 1 error, 126 validation failed, 255 usage error (an
unknown flag or a value click cannot parse). Rules and results go to stdout, logs to stderr.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import click

from meshnet import logs
from meshnet.errors import MeshnetError
from meshnet.flags import ENV_ONLY, EXTENSIONS, ISTIO_FLAGS, LOG_FLAGS, Flag

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
@click.version_option(package_name="meshnet")
def cli() -> None:
    """meshnet: Istio-compatible sidecar traffic interception."""


@cli.command("istio-iptables", epilog=_ENV_ONLY_HELP)
@istio_flags
def istio_iptables(**given: str | None) -> None:
    """Plan and apply the sidecar's rules (drop-in for `pilot-agent istio-iptables`)."""
    from meshnet.run import run_istio_iptables

    run_istio_iptables(given, os.environ)


@cli.command("clean", epilog=_ENV_ONLY_HELP)
@istio_flags
def clean(**given: str | None) -> None:
    """Remove exactly what the same flags install (= istio-iptables --cleanup-only)."""
    from meshnet.run import run_clean

    run_clean(given, os.environ)


@cli.command("istio-clean-iptables", epilog=_ENV_ONLY_HELP, hidden=True)
@istio_flags
def istio_clean_iptables(**given: str | None) -> None:
    """Alias of `meshnet clean` (Istio's removed istio-clean-iptables)."""
    from meshnet.run import run_clean

    run_clean(given, os.environ)


@cli.command("verify", epilog=_ENV_ONLY_HELP)
@istio_flags
def verify(**given: str | None) -> None:
    """Compare the live rules with the plan for these flags: exit 0 equal, 3 drifted."""
    from meshnet.run import run_verify

    sys.exit(run_verify(given, os.environ))


@cli.command("validate", epilog=_ENV_ONLY_HELP)
@istio_flags
def validate(**given: str | None) -> None:
    """Check that interception works, as istio-validation does (exit 126 when it does not)."""
    from meshnet.run import run_validate

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
@click.option(
    "--output",
    "output",
    type=click.Choice(["text", "json"]),
    default="text",
    help="text (default) or json.",
)
def explain(probes: tuple[str, ...], output: str, **given: str | None) -> None:
    """Show which rules a connection hits and whether it is captured (no root needed)."""
    from meshnet.run import run_explain

    run_explain(given, os.environ, probes, output)


@cli.group("cni")
def cni() -> None:
    """The sidecar-mode CNI plugin's node side."""


@cni.command("install", context_settings={"ignore_unknown_options": True})
def cni_install() -> None:
    """Install meshnet-cni on this node and keep it installed (options are env variables,
    as Istio's install-cni; see `python -m meshnet.cni.install -h`)."""
    from meshnet.cni import install

    sys.exit(install.main([], os.environ))


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
    from meshnet.demo import run

    run()


def _configure_logs_early(argv: list[str], environ: Mapping[str, str]) -> None:
    """Errors before option parsing still need a logger; honour the obvious JSON switches."""
    as_json = any(a in ("--log_as_json", "--log-format=json") for a in argv)
    as_json = as_json or environ.get("MESHNET_LOG_FORMAT") == "json"
    logs.configure("json" if as_json else "text")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    _configure_logs_early(args, os.environ)
    try:
        cli.main(args=args, prog_name="meshnet", standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.UsageError as err:
        click.echo(f"Error: {err.format_message()}", err=True)
        if err.ctx is not None:
            click.echo(f"Run '{err.ctx.command_path} --help' for usage.", err=True)
        sys.exit(USAGE_EXIT)
    except click.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except MeshnetError as err:
        logs.get().error(str(err))
        sys.exit(err.exit_code)
    sys.exit(0)
