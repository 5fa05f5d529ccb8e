"""The commands' flow: options → plan → print (dry run) or hand to the engine.

`--network-namespace` is entered before anything else, so IPv6 detection, binary detection,
rules and routes all see the pod's namespace (SPEC.md §4 item 3).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext

import click

from meshnet import logs, netns, options, planner
from meshnet.environment import HostSystem
from meshnet.errors import MeshnetError
from meshnet.model import Ruleset
from meshnet.options import Options
from meshnet.render import jsonout, restore, transcript


@contextmanager
def prepared(
    given: Mapping[str, str | None], environ: Mapping[str, str]
) -> Iterator[tuple[Options, Ruleset]]:
    """Enter the namespace (if any), then validate the options and plan, inside it."""
    raw = options.gather(given, environ)
    namespace = raw["network_namespace"].text
    with netns.entered(namespace) if namespace else nullcontext():
        opts = options.build(raw, HostSystem())
        logs.configure(opts.log_format, opts.log_level)
        ruleset = planner.plan(opts)
        for warning in ruleset.warnings:
            logs.get().warning(warning)
        yield opts, ruleset


def render(opts: Options, ruleset: Ruleset) -> str:
    if opts.output_format == "transcript":
        return transcript.render(ruleset, cleanup_only=opts.cleanup_only)
    if opts.output_format == "json":
        return jsonout.render(ruleset)
    if opts.output_format == "dot":
        from meshnet.render import dot

        return dot.render(ruleset)
    return restore.render(ruleset)


def run_istio_iptables(given: Mapping[str, str | None], environ: Mapping[str, str]) -> None:
    with prepared(given, environ) as (opts, ruleset):
        if opts.skip_rule_apply:
            logs.get().info("skipping rule application (--skip-rule-apply)")
        elif opts.native_nftables or opts.output_format == "nft":
            _run_nftables(opts)
        elif opts.dry_run:
            click.echo(render(opts, ruleset), nl=False)
        else:
            from meshnet import engine

            engine.program(opts, ruleset)
        if opts.run_validation:
            from meshnet import validation

            validation.run(opts)


def _run_nftables(opts: Options) -> None:
    """--native-nftables: Istio's nft mode ignores --dry-run; meshnet honours it (SPEC.md §4)."""
    from meshnet import nftplan
    from meshnet.render import nft

    if opts.dry_run and opts.output_format not in ("nft", "restore", "dot"):
        raise MeshnetError(
            f"--output-format {opts.output_format} is not available with --native-nftables "
            "(use nft)"
        )
    ruleset = nftplan.plan_nft(opts)
    for warning in ruleset.warnings:
        logs.get().warning(warning)
    if opts.dry_run:
        if opts.output_format == "dot":
            from meshnet.render import dot

            click.echo(dot.render_nft(ruleset), nl=False)
        else:
            click.echo(nft.render(ruleset), nl=False)
        return
    from meshnet import nftengine

    nftengine.program(opts, ruleset)


def run_clean(given: Mapping[str, str | None], environ: Mapping[str, str]) -> None:
    run_istio_iptables({**given, "cleanup_only": "true"}, environ)


def run_verify(given: Mapping[str, str | None], environ: Mapping[str, str]) -> int:
    """Print the drift between live state and plan; 0 when equal, 3 when drifted."""
    from meshnet import engine

    with prepared(given, environ) as (opts, ruleset):
        if opts.native_nftables:
            from meshnet import nftengine, nftplan

            lines = nftengine.verify(opts, nftplan.plan_nft(opts))
        else:
            lines = engine.verify(opts, ruleset)
    if not lines:
        click.echo("in sync: the live rules match the plan")
        return 0
    click.echo(f"drifted: {len(lines)} difference(s) between the live rules and the plan")
    for line in lines:
        click.echo(f"  {line}")
    return 3


def run_validate(given: Mapping[str, str | None], environ: Mapping[str, str]) -> None:
    from meshnet import validation

    with prepared(given, environ) as (opts, _ruleset):
        validation.run(opts)


def run_explain(
    given: Mapping[str, str | None],
    environ: Mapping[str, str],
    specs: tuple[str, ...],
    output: str,
) -> None:
    """Walk each probe through the plan these flags give (nft plan with --native-nftables)."""
    import json

    from meshnet import explain, nftplan, probe

    probes = [probe.parse(spec) for spec in specs]  # bad syntax fails before anything else
    with prepared(given, environ) as (opts, ruleset):
        if opts.native_nftables:
            nft_plan = nftplan.plan_nft(opts)
            results = [explain.explain_nft(nft_plan, p) for p in probes]
        else:
            results = [explain.explain_iptables(ruleset, p) for p in probes]
    if output == "json":
        click.echo(json.dumps([explain.render_json(r) for r in results], indent=2))
    else:
        click.echo("\n".join(explain.render_text(r) for r in results), nl=False)
