"""One istio-iptables run: options → plan → print (dry run) or apply."""

from __future__ import annotations

from collections.abc import Mapping

import click

from meshnet import logs, options, planner
from meshnet.environment import HostSystem
from meshnet.errors import MeshnetError
from meshnet.model import Ruleset
from meshnet.options import Options
from meshnet.render import jsonout, restore, transcript


def load_options(given: Mapping[str, str | None], environ: Mapping[str, str]) -> Options:
    raw = options.gather(given, environ)
    opts = options.build(raw, HostSystem())
    logs.configure(opts.log_format, opts.log_level)
    return opts


def render(opts: Options, ruleset: Ruleset) -> str:
    if opts.output_format == "transcript":
        return transcript.render(ruleset, cleanup_only=opts.cleanup_only)
    if opts.output_format == "json":
        return jsonout.render(ruleset)
    return restore.render(ruleset)


def run_istio_iptables(given: Mapping[str, str | None], environ: Mapping[str, str]) -> None:
    opts = load_options(given, environ)
    log = logs.get()
    if opts.native_nftables:
        raise MeshnetError("--native-nftables is not implemented yet")
    if opts.skip_rule_apply:
        log.info("skipping rule application (--skip-rule-apply)")
        return
    ruleset = planner.plan(opts)
    for warning in ruleset.warnings:
        log.warning(warning)
    if opts.dry_run:
        click.echo(render(opts, ruleset), nl=False)
        return
    raise MeshnetError("applying rules is not implemented yet (use --dry-run)")
