"""The commands' flow: options → plan → print (dry run) or hand to the engine.

`--network-namespace` is entered before anything else, so IPv6 detection, binary detection,
rules and routes all see the pod's namespace.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext

from meshnet import logs, netns, options
from meshnet.environment import HostSystem
from meshnet.errors import MeshnetError, OptionError
from meshnet.model import Ruleset
from meshnet.options import Options
from meshnet.plan import iptables
from meshnet.render import restore, transcript


@contextmanager
def entered(
    given: Mapping[str, str | None],
    environ: Mapping[str, str],
    *,
    needs_plan: bool = True,
    prints_rules: bool = False,
) -> Iterator[Options]:
    """Enter the namespace (if any), then validate the options inside it.

    Without `needs_plan` (the complete sweep, which no flag scopes) IPv6 is not detected from
    the interface addresses: a namespace with none would otherwise fail for nothing.
    """
    raw = options.gather(given, environ)
    if not needs_plan and not raw["enable_ipv6"].explicit:
        raw["enable_ipv6"] = options.Raw("false", "not needed by clean")
    namespace = raw["network_namespace"].text
    with netns.entered(namespace) if namespace else nullcontext():
        opts = options.build(raw, HostSystem())
        logs.configure(opts.log_format, opts.log_level)
        if prints_rules:
            _require_dry_run_for_output_format(raw, opts)
        yield opts


def _require_dry_run_for_output_format(raw: Mapping[str, options.Raw], opts: Options) -> None:
    """--output-format only chooses what --dry-run prints: without it, nothing is printed and
    the rules would be applied, which is not what a user asking for a format means."""
    if raw["output_format"].explicit and not opts.dry_run:
        raise OptionError(
            f"{raw['output_format'].origin} {opts.output_format!r} only chooses what --dry-run "
            "prints: add --dry-run to print the rules, or drop it to apply them"
        )


@contextmanager
def prepared(
    given: Mapping[str, str | None], environ: Mapping[str, str], *, prints_rules: bool = False
) -> Iterator[tuple[Options, Ruleset]]:
    """Enter the namespace (if any), then validate the options and plan, inside it.
    `prints_rules`: the command prints rules with --dry-run, and applies them without it."""
    with entered(given, environ, prints_rules=prints_rules) as opts:
        ruleset = iptables.ruleset(opts)
        for warning in ruleset.warnings:
            logs.get().warning(warning)
        yield opts, ruleset


def _write(text: str) -> None:
    """Rules and reports go to stdout; sys.stdout is written directly (click costs an init
    container more to import than its rule work)."""
    sys.stdout.write(text)


def render(opts: Options, ruleset: Ruleset) -> str:
    if opts.output_format == "transcript":
        return transcript.render(ruleset, cleanup_only=opts.cleanup_only)
    if opts.output_format == "json":
        from meshnet.render import jsonout  # the json encoder only for this output

        return jsonout.render(ruleset)
    if opts.output_format == "dot":
        from meshnet.render import dot

        return dot.render(ruleset)
    return restore.render(ruleset)


def run_istio_iptables(given: Mapping[str, str | None], environ: Mapping[str, str]) -> None:
    with prepared(given, environ, prints_rules=True) as (opts, ruleset):
        if opts.skip_rule_apply:
            logs.get().info("skipping rule application (--skip-rule-apply)")
        elif opts.native_nftables or opts.output_format == "nft":
            _run_nftables(opts)
        elif opts.dry_run:
            _write(render(opts, ruleset))
        else:
            from meshnet import engine

            engine.program(opts, ruleset)
        if opts.run_validation:
            from meshnet import validation

            validation.run(opts)


def _run_nftables(opts: Options) -> None:
    """--native-nftables: Istio's nft mode ignores --dry-run; meshnet honours it."""
    from meshnet.plan import nftables
    from meshnet.render import nft

    if opts.dry_run and opts.output_format not in ("nft", "restore", "dot"):
        raise MeshnetError(
            f"--output-format {opts.output_format} is not available with --native-nftables "
            "(use nft)"
        )
    ruleset = nftables.ruleset(opts)
    for warning in ruleset.warnings:
        logs.get().warning(warning)
    if opts.dry_run:
        if opts.output_format == "dot":
            from meshnet.render import dot

            _write(dot.render_nft(ruleset))
        else:
            _write(nft.render(ruleset))
        return
    from meshnet import nftengine

    nftengine.program(opts, ruleset)


def run_clean(given: Mapping[str, str | None], environ: Mapping[str, str]) -> None:
    """Remove everything Istio or meshnet installed, whatever the flags (they are checked, but
    scope nothing); --dry-run prints the removal instead."""
    from meshnet import sweep

    with entered(given, environ, needs_plan=False, prints_rules=True) as opts:
        if opts.dry_run:
            _write(sweep.find().render())
            return
        in_pod = opts.cni_mode and opts.network_namespace
        sweep.sweep(lockfile=netns.resolve(opts.network_namespace) if in_pod else None)


def run_verify(
    given: Mapping[str, str | None], environ: Mapping[str, str], output: str = "text"
) -> int:
    """Print the drift between live state and plan; 0 when equal, 3 when drifted."""
    from meshnet import engine

    with prepared(given, environ) as (opts, ruleset):
        if opts.native_nftables:
            from meshnet import nftengine
            from meshnet.plan import nftables

            lines = nftengine.verify(opts, nftables.ruleset(opts))
            backends = {f: "nftables" for f in ("ipv4", "ipv6")[: 1 + ruleset.ipv6_enabled]}
        else:
            lines, backends = engine.verify(opts, ruleset)
    if output == "json":
        import json

        document = {"in_sync": not lines, "backend": backends, "differences": lines}
        _write(json.dumps(document, indent=2) + "\n")
        return 3 if lines else 0
    used = ", ".join(f"{family} {tool}" for family, tool in backends.items())
    if not lines:
        _write(f"in sync: the live rules match the plan ({used})\n")
        return 0
    _write(f"drifted: {len(lines)} difference(s) between the live rules and the plan ({used})\n")
    for line in lines:
        _write(f"  {line}\n")
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

    from meshnet import explain, probe
    from meshnet.plan import nftables

    probes = [probe.parse(spec) for spec in specs]  # bad syntax fails before anything else
    with prepared(given, environ) as (opts, ruleset):
        if opts.native_nftables:
            nft_plan = nftables.ruleset(opts)
            results = [explain.explain_nft(nft_plan, p) for p in probes]
        else:
            results = [explain.explain_iptables(ruleset, p) for p in probes]
    if output == "json":
        _write(json.dumps([explain.render_json(r) for r in results], indent=2) + "\n")
    else:
        _write("\n".join(explain.render_text(r) for r in results))
