"""The commands' flow: options → backend and its plan → print (dry run) or apply.

`--network-namespace` is entered before anything else, so IPv6 detection, binary detection,
rules and routes all see the pod's namespace.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext

from meshnet import logs
from meshnet.apply import backend
from meshnet.apply.backend import Backend
from meshnet.config import options
from meshnet.config.options import Options
from meshnet.errors import OptionError
from meshnet.host import netns
from meshnet.host.system import HostSystem


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
) -> Iterator[tuple[Options, Backend]]:
    """Enter the namespace (if any), then validate the options and plan for the backend they
    choose, inside it. `prints_rules`: the command prints rules with --dry-run, and applies
    them without it."""
    with entered(given, environ, prints_rules=prints_rules) as opts:
        chosen = backend.select(opts)
        for warning in chosen.warnings:
            logs.get().warning(warning)
        yield opts, chosen


def _write(text: str) -> None:
    """Rules and reports go to stdout; sys.stdout is written directly (click costs an init
    container more to import than its rule work)."""
    sys.stdout.write(text)


def run_istio_iptables(given: Mapping[str, str | None], environ: Mapping[str, str]) -> None:
    with prepared(given, environ, prints_rules=True) as (opts, chosen):
        if opts.skip_rule_apply:
            logs.get().info("skipping rule application (--skip-rule-apply)")
        elif opts.dry_run:
            _write(chosen.dry_run())
        else:
            chosen.program()
        if opts.run_validation:
            from meshnet.host import capture_check

            capture_check.check(opts)


def run_clean(given: Mapping[str, str | None], environ: Mapping[str, str]) -> None:
    """Remove everything Istio or meshnet installed, whatever the flags (they are checked, but
    scope nothing); --dry-run prints the removal instead."""
    from meshnet.apply import sweep

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
    with prepared(given, environ) as (_opts, chosen):
        verified = chosen.verify()
    lines, backends = list(verified.differences), dict(verified.used)
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
    from meshnet.host import capture_check

    with prepared(given, environ) as (opts, _ruleset):
        capture_check.check(opts)


def run_explain(
    given: Mapping[str, str | None],
    environ: Mapping[str, str],
    specs: tuple[str, ...],
    output: str,
) -> None:
    """Walk each probe through the plan these flags give (nft plan with --native-nftables)."""
    import json

    from meshnet import explain
    from meshnet.explain import probe

    probes = [probe.parse(spec) for spec in specs]  # bad syntax fails before anything else
    with prepared(given, environ) as (_opts, chosen):
        results = [chosen.explain(p) for p in probes]
    if output == "json":
        _write(json.dumps([explain.render_json(r) for r in results], indent=2) + "\n")
    else:
        _write("\n".join(explain.render_text(r) for r in results))
