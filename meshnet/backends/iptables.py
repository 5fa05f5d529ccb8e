"""The iptables backend: pick the binary (SPEC-istio §3.3), lock (§3.4), restore, save.

One `IptablesRunner` drives one family (iptables or ip6tables) with one detected binary set.
Everything runs in the calling thread's network namespace (see `meshnet.netns.entered`).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from meshnet import netns, proc
from meshnet.errors import BackendError

__all__ = [
    "LOCK_WAIT_FLAG",
    "IptablesBinary",
    "IptablesRunner",
    "detect",
    "probe",
]

_log = logging.getLogger(__name__)

LOCK_WAIT_FLAG = "--wait=30"
"""Appended to every write command when the binary takes the xtables lock."""

_LOCKING_VERSION = (1, 6, 2)  # legacy iptables(-restore) takes the lock from here on
_LOCKFILE_ENV_VERSION = (1, 8, 6)  # XTABLES_LOCKFILE is honoured from here on
_VERSION_PATTERN = re.compile(r"v([0-9]+(\.[0-9]+)+)")
# Protocol 255 never matches; nat (not filter) so a missing iptable_nat module is detected.
_PROBE_RULE = ("-t", "nat", "-A", "INPUT", "-p", "255", "-j", "RETURN")
_PROBE_LINE = "-A INPUT -p 255 -j RETURN"  # as the save tools print it

_SAVE_TIMEOUT = 30.0
_WRITE_TIMEOUT = 45.0  # longer than the 30 s lock wait
_RESTORE_TIMEOUT = 60.0

# xtables exit codes 1-4 (xtables_exittype), worded as Istio's transformToXTablesErrorMessage.
_XTABLES_PROBLEMS = {
    1: "xtables other problem",
    2: "xtables parameter problem",
    3: "xtables version problem",
    4: "xtables resource problem",
}


@dataclass(frozen=True, slots=True)
class IptablesBinary:
    """One detected binary set, as Istio's IptablesVersion."""

    binary: str
    save: str
    restore: str
    version: tuple[int, ...]
    legacy: bool
    existing_rules: bool
    saved: str | None = field(default=None, compare=False)  # the save output seen probing

    @property
    def needs_lock(self) -> bool:
        """Legacy ≥ 1.6.2 takes the xtables lock; nf_tables never does."""
        return self.legacy and self.version >= _LOCKING_VERSION


def detect(ipv6: bool, force: str = "", *, lockfile: str | None = None) -> IptablesBinary:
    """Choose the binary set for one family exactly as Istio's DetectIptablesVersion.

    `force` is "" (auto), "legacy" or "nft". Auto: legacy if it is usable and already has
    rules, else nft if usable, else the plain binary (whose error, if any, is raised).
    `lockfile` is the pod's netns path in CNI mode, so the probe's writes use the pod lock.
    """
    prefix = "ip6tables" if ipv6 else "iptables"
    if force == "legacy":
        return probe(f"{prefix}-legacy", lockfile=lockfile)
    if force == "nft":
        return probe(f"{prefix}-nft", lockfile=lockfile)
    if force:
        raise BackendError(f'iptables binary "{force}" unsupported')
    # Istio probes legacy first and keeps it only when it holds rules. meshnet asks the cheap
    # question first: the kernel probe writes a legacy nat table that stays behind (visible in
    # every later iptables-save), which is pointless when legacy would not be chosen anyway.
    if _holds_rules(f"{prefix}-legacy-save"):
        try:
            return probe(f"{prefix}-legacy", lockfile=lockfile)
        except BackendError as err:
            _log.debug("did not find (or cannot use) %s-legacy: %s", prefix, err)
    try:
        return probe(f"{prefix}-nft", lockfile=lockfile)
    except BackendError as err:
        _log.debug("did not find (or cannot use) %s-nft: %s", prefix, err)
    return probe(prefix, lockfile=lockfile)


def probe(binary: str, *, lockfile: str | None = None) -> IptablesBinary:
    """Istio's shouldUseBinaryForCurrentContext: is `binary` usable here, and has it rules?"""
    save, restore = f"{binary}-save", f"{binary}-restore"
    _require_in_path(binary, save, restore)
    dump = proc.run([save], timeout=_SAVE_TIMEOUT)
    if dump.returncode != 0:
        raise BackendError(
            f"failed to execute {save}: exit status {dump.returncode} "
            f"{(dump.stdout + dump.stderr).strip()}" + _permission_hint(dump.stderr)
        )
    version, legacy = _read_version(save)
    found = IptablesBinary(binary, save, restore, version, legacy, _has_rules(dump), dump.stdout)
    _probe_kernel_support(found, lockfile)
    if _PROBE_LINE in dump.stdout.splitlines():
        # A run killed between the probe's -A and -D left one: remove it, and see without it.
        IptablesRunner(found, lockfile=lockfile).run(_probe_removal())
        dump = proc.run([save], timeout=_SAVE_TIMEOUT)
        found = replace(found, existing_rules=_has_rules(dump), saved=dump.stdout)
    return found


def describe(binary: str) -> IptablesBinary:
    """A binary set's version and kind, without the kernel probe: for a namespace whose rules
    this backend is already known to hold (so the kernel plainly supports it)."""
    save, restore = f"{binary}-save", f"{binary}-restore"
    _require_in_path(binary, save, restore)
    version, legacy = _read_version(save)
    return IptablesBinary(binary, save, restore, version, legacy, True)


def _require_in_path(*names: str) -> None:
    for name in names:
        if shutil.which(name) is None:
            raise BackendError(f"iptables binary {name} not found in PATH")


def _holds_rules(save: str) -> bool:
    """Whether `save` exists, runs and prints at least one rule."""
    if shutil.which(save) is None:
        return False
    dump = proc.run([save], timeout=_SAVE_TIMEOUT)
    return dump.returncode == 0 and _has_rules(dump)


def _has_rules(dump: subprocess.CompletedProcess[str]) -> bool:
    # Istio counts >= 3 newlines, but its own legacy kernel probe (`-t nat -A/-D`) leaves an
    # empty legacy nat table that prints 8 lines: every later run in the namespace would then
    # pick legacy and install the rules a second time. meshnet counts real rules instead.
    return any(line.startswith("-A ") for line in dump.stdout.splitlines())


def _read_version(save: str) -> tuple[tuple[int, ...], bool]:
    """(version, legacy) from `<save> --version`; very old savers reject it: assume 0.0.0 legacy."""
    result = proc.run([save, "--version"], timeout=_SAVE_TIMEOUT)
    if result.returncode != 0 or "unrecognized option" in result.stderr:
        _log.warning("%s does not support --version, assuming a very old legacy version", save)
        return (0, 0, 0), True
    match = _VERSION_PATTERN.search(result.stdout)
    if match is None:
        raise BackendError(
            f"iptables version {result.stdout!r} is not a valid version string: "
            f"no iptables version found for: {result.stdout!r}"
        )
    version = tuple(int(part) for part in match.group(1).split("."))
    # Legacy prints "(legacy)" or nothing; only nf_tables is marked.
    return version, "nf_tables" not in result.stdout


def _probe_kernel_support(found: IptablesBinary, lockfile: str | None) -> None:
    runner = IptablesRunner(found, lockfile=lockfile)
    added = runner.run(_PROBE_RULE)
    if added.returncode != 0 or "does not exist" in added.stderr:
        raise BackendError(
            f"iptables binary {found.binary} has no loaded kernel support and cannot be used, "
            f"err: exit status {added.returncode} out: {added.stderr.strip()}"
            + _permission_hint(added.stderr)
        )
    runner.run(_probe_removal())  # best effort, as Istio: the rule never matches anything anyway


def _probe_removal() -> tuple[str, ...]:
    return tuple("-D" if arg == "-A" else arg for arg in _PROBE_RULE)


class IptablesRunner:
    """Runs one family's iptables, -save and -restore in the current network namespace."""

    __slots__ = ("_env", "binary")

    def __init__(self, binary: IptablesBinary, *, lockfile: str | None = None) -> None:
        """`lockfile`: the pod's netns path in CNI mode, used as a pod-scoped xtables lock."""
        self.binary = binary
        self._env = _lock_env(binary, lockfile)

    def save(self) -> str:
        """The `<save>` output for this family; BackendError when it fails."""
        argv = [self.binary.save]
        result = proc.run(argv, timeout=_SAVE_TIMEOUT)
        if result.returncode != 0:
            raise BackendError(_failure(argv, result))
        return result.stdout

    def restore(self, text: str) -> None:
        """Apply restore text with `<restore> --noflush` on stdin.

        Each table block is committed on its own: a failure leaves the failing table untouched
        but keeps tables committed before it (both legacy and nft behave so).
        """
        self._restore(text, "--noflush")

    def restore_replace(self, text: str) -> None:
        """Apply restore text *without* --noflush: every table named in `text` is replaced whole.

        For rollback: feed a `save()` snapshot back, or ``*nat\\nCOMMIT\\n`` to empty a table
        (its user chains are deleted too). Tables not named in `text` are left alone.
        """
        self._restore(text)

    def _restore(self, text: str, *flags: str) -> None:
        argv = [self.binary.restore, *flags, *self._wait_flag()]
        result = proc.run(argv, stdin=text, timeout=_RESTORE_TIMEOUT, env=self._env)
        if result.returncode != 0:
            raise BackendError(_failure(argv, result))

    def run(self, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        """Run `<iptables> ARGS` (-C/-D/-F/-X/-I...); the caller judges a non-zero exit."""
        argv = [self.binary.binary, *args, *self._wait_flag()]
        return proc.run(argv, timeout=_WRITE_TIMEOUT, env=self._env)

    def check(self, args: Sequence[str]) -> bool:
        """True when `<iptables> ARGS` succeeds, e.g. ``-t nat -C ISTIO_OUTPUT -j RETURN``."""
        return self.run(args).returncode == 0

    def canonicalize(self, text: str, prepare: Callable[[], None] | None = None) -> str:
        """Restore `text` into a throw-away, empty network namespace and return its save output.

        iptables-save respells rules (`-m tcp` added, marks in hex, options reordered) and
        resolves `-I` positions; comparing a plan with live state needs this canonical form.
        `prepare` runs first in that namespace (e.g. to create the ipsets the rules match).
        """

        def restore_and_save() -> str:
            if prepare is not None:
                prepare()
            self.restore(text)
            return self.save()

        return netns.run_isolated(restore_and_save)

    def _wait_flag(self) -> tuple[str, ...]:
        return (LOCK_WAIT_FLAG,) if self.binary.needs_lock else ()


def _lock_env(binary: IptablesBinary, lockfile: str | None) -> Mapping[str, str] | None:
    # CNI mode: a pod-scoped lock (the netns file) instead of the host's /run/xtables.lock, so
    # pods do not contend with kube-proxy or each other. Older legacy versions would need
    # Istio's bind-mount sandbox, which meshnet does not do: they keep the host lock.
    if lockfile and binary.needs_lock and binary.version >= _LOCKFILE_ENV_VERSION:
        return {"XTABLES_LOCKFILE": lockfile}
    return None


def _failure(argv: Sequence[str], result: subprocess.CompletedProcess[str]) -> str:
    """One line: the command, then the tool's own message (line numbers included)."""
    message = f"`{proc.format_command(argv)}` failed: {_xtables_message(result)}"
    return message + _permission_hint(result.stderr)


def _permission_hint(stderr: str) -> str:
    if "Permission denied" in stderr or "Operation not permitted" in stderr:
        return (
            " (meshnet needs root with the NET_ADMIN and NET_RAW capabilities in the pod's "
            "network namespace; an init container must add them to its securityContext)"
        )
    return ""


def _xtables_message(result: subprocess.CompletedProcess[str]) -> str:
    lines = [
        line.strip()
        for line in result.stderr.splitlines()
        if line.strip() and not line.lstrip().startswith("Try `")
    ]
    text = "; ".join(lines) or proc.stderr_summary(result) or "no output"
    problem = _XTABLES_PROBLEMS.get(result.returncode)
    if problem is None:
        return f"exit status {result.returncode}: {text}"
    # Drop the "iptables-restore v1.8.9 (legacy):" program prefix, as Istio does.
    detail = text.split(":", 1)[1].strip() if ":" in text else text
    return f"{problem}: {detail}"
