"""ipset for --cidr-sets: create and fill the sets the rules match, read them, destroy them.

Sets are loaded with one `ipset restore` (create -exist, flush, add): every set is complete
before a rule can reference it. Sets are per network namespace, like the rules.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from meshnet.errors import BackendError
from meshnet.host import proc
from meshnet.plan.model import IpSet

_TIMEOUT = 60.0


def require() -> None:
    if proc.which("ipset") is None:
        raise BackendError(
            "--cidr-sets needs the ipset tool, which is not in PATH (Debian: apt-get install ipset)"
        )


def load(sets: Iterable[IpSet]) -> None:
    """Create (or empty) and fill each set, in one `ipset restore`."""
    lines: list[str] = []
    for s in sets:
        size = max(65536, 2 * len(s.members))
        lines += [
            f"create {s.name} hash:net family {s.kernel_family} maxelem {size} -exist",
            f"flush {s.name}",
        ]
        lines += [f"add {s.name} {member} -exist" for member in s.members]
    if lines:
        _run(["ipset", "restore"], "\n".join(lines) + "\n")


def existing() -> set[str]:
    result = proc.run(["ipset", "list", "-n"], timeout=_TIMEOUT)
    return set(result.stdout.split()) if result.returncode == 0 else set()


def members(name: str) -> set[str] | None:
    """The networks in a set, normalised; None when the set does not exist."""
    result = proc.run(["ipset", "save", name], timeout=_TIMEOUT)
    if result.returncode != 0:
        return None
    found = set()
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "add":
            found.add(str(ipaddress.ip_network(parts[2], strict=False)))
    return found


def destroy(names: Iterable[str]) -> None:
    """Destroy sets (absent ones are fine); only once no rule references them."""
    for name in names:
        proc.run(["ipset", "destroy", name], timeout=_TIMEOUT)


def diff(planned: Iterable[IpSet]) -> list[str]:
    """Readable differences between the planned and the live sets."""
    lines: list[str] = []
    for s in planned:
        live = members(s.name)
        if live is None:
            lines.append(f"missing ipset {s.name}")
            continue
        want = {str(ipaddress.ip_network(m, strict=False)) for m in s.members}
        lines += [f"ipset {s.name}: missing member {m}" for m in sorted(want - live)]
        lines += [f"ipset {s.name}: unexpected member {m}" for m in sorted(live - want)]
    return lines


def _run(argv: list[str], stdin: str) -> None:
    result = proc.run(argv, stdin=stdin, timeout=_TIMEOUT)
    if result.returncode != 0:
        raise BackendError(f"`{' '.join(argv)}` failed: {proc.stderr_summary(result)}")
