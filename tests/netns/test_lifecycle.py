"""meshnet's lifecycle in real namespaces: re-runs, drift and --reconcile, clean, backend
auto-detection, faults (all or nothing), validation mode and verify.

Every test works in the pod namespace of a fresh `Topology`; meshnet is the real CLI in a
subprocess (`tests.support.cli.meshnet`), pointed at the pod with `--network-namespace`. "As
found" means the namespace's whole state: iptables-save of both backends and both families
(comment lines dropped, counters zeroed), policy rules, routes of every table, lo's addresses.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.cli import clean_env, meshnet
from tests.support.netstate import (
    BACKENDS,
    NFT_COUNTERS,
    ROUTING,
    SAVERS,
    assert_same_state,
    normalize_save,
)
from tests.support.repo import REPO

from .harness import (
    FAMILIES,
    NS_PREFIX,
    PYTHON,
    Landing,
    Topology,
    netns_argv,
    netns_path,
)

PROXY_UID = 1337
STANDARD = (
    *("-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT"),
    *("-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"),
)
STANDARD_DUAL = (*STANDARD, "--dual-stack")
TPROXY_DUAL = (*STANDARD, "-m", "TPROXY", "--dual-stack")  # the later -m wins
MODES = {"redirect-v4": STANDARD, "redirect-dual": STANDARD_DUAL, "tproxy-dual": TPROXY_DUAL}

backend_param = pytest.mark.parametrize("backend", BACKENDS)
USER_CHAIN = re.compile(r"^:\S+ - ")

# Rules of another owner in every table meshnet may touch, each with a chain of its own and
# rules in the built-in chains meshnet appends to. Valid for both families (no addresses).
FOREIGN_RULES = """\
*raw
:FOREIGN - [0:0]
-A FOREIGN -p udp --dport 9001 -j ACCEPT
-A PREROUTING -p udp --dport 9001 -j FOREIGN
-A OUTPUT -p udp --dport 9002 -j ACCEPT
COMMIT
*mangle
:FOREIGN - [0:0]
-A FOREIGN -p tcp --dport 9003 -j MARK --set-mark 7
-A PREROUTING -p tcp -j FOREIGN
-A INPUT -p tcp --dport 9004 -j ACCEPT
-A OUTPUT -p tcp --dport 9005 -j ACCEPT
COMMIT
*nat
:FOREIGN - [0:0]
-A FOREIGN -p tcp --dport 9006 -j RETURN
-A PREROUTING -p tcp -j FOREIGN
-A INPUT -p tcp --dport 9007 -j RETURN
-A OUTPUT -p tcp --dport 9008 -j RETURN
COMMIT
*filter
:FOREIGN - [0:0]
-A FOREIGN -p tcp --dport 9009 -j ACCEPT
-A INPUT -p tcp -j FOREIGN
-A OUTPUT -p udp --dport 9010 -j ACCEPT
COMMIT
"""

# A test double for ip6tables-{nft,legacy}-restore: it refuses the apply into the pod (a
# `--noflush` restore of ISTIO_ chains in the namespace named by $MNT_FAIL_NETNS), after
# recording the pod's IPv4 rules at that moment. The backend's kernel probe (a `--noflush`
# restore without ISTIO_), meshnet's canonicalisation (a private namespace) and its rollback
# (no --noflush) reach the real tool. No ':' in the message: it survives meshnet's rewording.
FAILING_RESTORE = """\
#!/bin/sh
input=$(cat)
if [ "$(readlink /proc/self/ns/net)" = "$MNT_FAIL_NETNS" ]; then
    for arg in "$@"; do
        case "$arg:$input" in --noflush:*ISTIO_*)
            {v4_save} > "$MNT_SEEN_V4"
            echo "injected failure from the test wrapper" >&2
            exit 1
        esac
    done
fi
printf '%s\\n' "$input" | exec {real} "$@"
"""

# Holds an flock (what iptables-legacy takes) on argv[1] for argv[2] seconds.
LOCK_HOLDER = """\
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("LOCKED", flush=True)
time.sleep(float(sys.argv[2]))
"""
LOCK_HOLD = 2.0


# --------------------------------------------------------------------------- helpers


def rule_content(save: str) -> list[str]:
    """Rules and user chains only: what is left when empty built-in tables are ignored."""
    return [line for line in save.splitlines() if line.startswith("-A ") or USER_CHAIN.match(line)]


def assert_no_rules_left(after: dict[str, str], before: dict[str, str]) -> None:
    """As found, except for empty built-in tables (which is why `nft list ruleset` is not
    compared): legacy tables cannot be unloaded, and iptables-restore cannot delete an nft
    table; Istio's own kernel probe (`-t nat -A/-D INPUT`) leaves one too."""
    for saver in SAVERS:
        assert rule_content(after[saver]) == rule_content(before[saver]), after[saver]
    assert_same_state({k: after[k] for k in ROUTING}, {k: before[k] for k in ROUTING})


def netfilter_state(topo: Topology) -> dict[str, str]:
    """Both backends' saves for both families, and `nft list ruleset` (what iptables-nft-save
    does not show, e.g. an extra base chain), counters zeroed."""
    state = {
        saver: normalize_save(topo.exec(topo.pod_ns, [saver], check=True).stdout)
        for saver in SAVERS
    }
    ruleset = topo.exec(topo.pod_ns, ["nft", "list", "ruleset"], check=True).stdout
    state["nft"] = NFT_COUNTERS.sub("packets 0 bytes 0", ruleset)
    return state


def routing_state(topo: Topology) -> dict[str, str]:
    """Policy rules, routes of every table, lo's addresses. Link-local lines are left out:
    eth0's fe80:: address (and its local route) appears whenever its DAD ends, test or not."""
    state = {}
    for name, argv in ROUTING.items():
        shown = subprocess.run(
            ["ip", "-n", topo.pod_ns, *argv], capture_output=True, text=True, check=True, timeout=10
        ).stdout
        state[name] = "".join(line for line in shown.splitlines(True) if "fe80:" not in line)
    return state


def namespace_state(topo: Topology) -> dict[str, str]:
    return {**netfilter_state(topo), **routing_state(topo)}


def without_nft(state: dict[str, str]) -> dict[str, str]:
    """For rollbacks: iptables-nft-restore of a saved table recreates it with every base chain
    and in another order, the same to iptables-nft-save but not to `nft list ruleset`."""
    return {key: text for key, text in state.items() if key != "nft"}


def run_meshnet(
    topo: Topology,
    command: str,
    flags: Sequence[str],
    *extra: str,
    backend: str | None = None,
    env: dict[str, str] | None = None,
    namespace: str | None = None,
) -> subprocess.CompletedProcess[str]:
    args = [command, *flags, "--network-namespace", namespace or topo.pod_ns, *extra]
    if backend:
        args += ["--force-iptables-binary", backend]
    return meshnet(args, env=env)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr}{result.stdout}"


def add_foreign_rules(topo: Topology, backend: str) -> None:
    for tool in ("iptables", "ip6tables"):
        argv = [f"{tool}-{backend}-restore", "--noflush", "--wait=30"]
        topo.exec(topo.pod_ns, argv, input=FOREIGN_RULES, check=True)


def assert_landed(landing: Landing, label: str, port: int) -> None:
    assert landing.landed_at(label, port), f"expected {label}:{port}, got {landing.where}"


def run_in_pod_as_proxy(
    topo: Topology, args: Sequence[str], timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """`python -m meshnet ARGS` inside the pod namespace as uid/gid 1337.

    The one capability kept, CAP_DAC_READ_SEARCH, only lets uid 1337 read the checkout and its
    venv wherever CI cloned them (e.g. a mode-700 mktemp dir); the owner match sees uid 1337.
    """
    ids = [
        f"--reuid={PROXY_UID}",
        f"--regid={PROXY_UID}",
        "--clear-groups",
        "--inh-caps=+dac_read_search",
        "--ambient-caps=+dac_read_search",
    ]
    argv = netns_argv(topo.pod_ns, ["setpriv", *ids, PYTHON, "-m", "meshnet", *args])
    return subprocess.run(  # fixed argument list, no shell
        argv, env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def failing_ipv6_restore(topo: Topology, tmp_path: Path, backend: str) -> dict[str, str]:
    """The env for a meshnet run whose IPv6 apply into the pod fails (see FAILING_RESTORE)."""
    name = f"ip6tables-{backend}-restore"
    real, v4_save = shutil.which(name), shutil.which(f"iptables-{backend}-save")
    assert real and v4_save
    bindir = tmp_path / "failing-bin"
    bindir.mkdir()
    wrapper = bindir / name
    wrapper.write_text(FAILING_RESTORE.format(real=real, v4_save=v4_save))
    wrapper.chmod(0o755)
    return {
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "MNT_FAIL_NETNS": f"net:[{os.stat(topo.pod_path).st_ino}]",
        "MNT_SEEN_V4": str(tmp_path / "seen-v4.save"),
    }


@contextmanager
def holding_lock(path: str, seconds: float) -> Iterator[subprocess.Popen[str]]:
    """A process of ours holding an flock on `path`; returns once the lock is taken."""
    holder = subprocess.Popen(  # fixed argument list, no shell
        [PYTHON, "-c", LOCK_HOLDER, path, str(seconds)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "LOCKED"
        yield holder
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(5)
        if holder.stdout is not None:
            holder.stdout.close()


# --------------------------------------------------------------------------- 1. re-run


@backend_param
@pytest.mark.parametrize("mode", ["redirect-dual", "tproxy-dual"])
def test_rerun_with_same_flags_is_a_noop(topology: Topology, backend: str, mode: str) -> None:
    assert_ok(run_meshnet(topology, "istio-iptables", MODES[mode], backend=backend))
    applied = namespace_state(topology)
    assert "ISTIO_INBOUND" in applied[f"iptables-{backend}-save"]
    assert "ISTIO_INBOUND" in applied[f"ip6tables-{backend}-save"]
    if mode == "tproxy-dual":  # and a second run must not add a second `ip rule`
        assert applied["rules4"].count("lookup 133") == 1

    again = run_meshnet(topology, "istio-iptables", MODES[mode], backend=backend)

    assert_ok(again)
    assert_same_state(namespace_state(topology), applied)


# --------------------------------------------------------------------------- 2. drift


@backend_param
def test_force_apply_does_not_replace_drifted_rules(topology: Topology, backend: str) -> None:
    """--force-apply re-applies rules that are in place (Istio's meaning); drift stays refused."""
    assert_ok(run_meshnet(topology, "istio-iptables", STANDARD_DUAL, backend=backend))
    applied = namespace_state(topology)
    new_flags = (*STANDARD_DUAL, "-d", "15090,15021")

    refused = run_meshnet(topology, "istio-iptables", new_flags, "--force-apply", backend=backend)

    assert refused.returncode == 1, refused.stderr
    assert "--reconcile" in refused.stderr
    assert_same_state(namespace_state(topology), applied)


@backend_param
def test_changed_flags_fail_without_reconcile_and_take_over_with_it(
    topology: Topology, backend: str
) -> None:
    new_flags = (*STANDARD_DUAL, "-d", "15090,15021")  # 15020 no longer excluded
    pod, peer = topology.pod_ns, topology.peer_ns
    assert_ok(run_meshnet(topology, "istio-iptables", STANDARD_DUAL, backend=backend))
    topology.start_listeners(pod, "proxy", [15001, 15006])
    topology.start_listeners(pod, "agent", [15020])
    topology.start_listeners(pod, "admin", [15021])
    for fam in FAMILIES:
        assert_landed(topology.probe(peer, fam.pod, 15020), "agent", 15020)
    applied = namespace_state(topology)

    refused = run_meshnet(topology, "istio-iptables", new_flags, backend=backend)

    assert refused.returncode == 1, refused.stderr
    assert "--reconcile" in refused.stderr
    assert "--dport 15020" in refused.stderr  # the drift is named
    assert_same_state(namespace_state(topology), applied)

    assert_ok(run_meshnet(topology, "istio-iptables", new_flags, "--reconcile", backend=backend))

    in_sync = run_meshnet(topology, "verify", new_flags, backend=backend)
    assert in_sync.returncode == 0, in_sync.stdout + in_sync.stderr
    assert "in sync" in in_sync.stdout
    stale = run_meshnet(topology, "verify", STANDARD_DUAL, backend=backend)
    assert stale.returncode == 3, stale.stdout + stale.stderr
    assert "15020" in stale.stdout
    saves = netfilter_state(topology)
    assert not [s for s in saves.values() if "-j DROP" in s], "reconcile guardrails left behind"
    for fam in FAMILIES:
        landing = topology.probe(peer, fam.pod, 15020)
        assert_landed(landing, "proxy", 15006)
        assert landing.orig_dst == fam.addr(fam.pod, 15020)
        assert_landed(topology.probe(peer, fam.pod, 15021), "admin", 15021)


# --------------------------------------------------------------------------- 3. clean


CLEAN_COMMANDS = {
    "clean": ("clean", ()),
    "cleanup-only": ("istio-iptables", ("--cleanup-only",)),
    "istio-clean-iptables": ("istio-clean-iptables", ()),
}


@backend_param
@pytest.mark.parametrize(
    ("mode", "how"),
    [
        ("redirect-v4", "clean"),
        ("redirect-dual", "clean"),
        ("redirect-dual", "cleanup-only"),
        ("redirect-dual", "istio-clean-iptables"),
        ("tproxy-dual", "clean"),
        ("tproxy-dual", "cleanup-only"),
        ("tproxy-dual", "istio-clean-iptables"),
    ],
)
def test_clean_restores_namespace_with_foreign_rules(
    topology: Topology, backend: str, mode: str, how: str
) -> None:
    flags = MODES[mode]
    add_foreign_rules(topology, backend)
    before = namespace_state(topology)
    assert "FOREIGN" in before[f"iptables-{backend}-save"]

    assert_ok(run_meshnet(topology, "istio-iptables", flags, backend=backend))
    applied = namespace_state(topology)
    assert "ISTIO_INBOUND" in applied[f"iptables-{backend}-save"]
    if mode.endswith("dual"):
        assert "ISTIO_INBOUND" in applied[f"ip6tables-{backend}-save"]
        assert "::6/128" in applied["lo"]
    if mode.startswith("tproxy"):
        assert "ISTIO_DIVERT" in applied[f"iptables-{backend}-save"]
        for family in "46":
            assert "fwmark 0x539 lookup 133" in applied[f"rules{family}"]
            assert "local default dev lo table 133" in applied[f"routes{family}"]

    command, extra = CLEAN_COMMANDS[how]
    assert_ok(run_meshnet(topology, command, flags, *extra, backend=backend))

    assert_same_state(namespace_state(topology), before)


@backend_param
def test_clean_without_rules_changes_nothing(topology: Topology, backend: str) -> None:
    add_foreign_rules(topology, backend)
    before = namespace_state(topology)

    assert_ok(run_meshnet(topology, "clean", TPROXY_DUAL, backend=backend))

    assert_same_state(namespace_state(topology), before)


# What `clean` must remove whatever flags it is given: each set installs something the others
# do not (TPROXY marks and routes with a non-default mark/table, -c/-k returns, DNS in raw,
# --drop-invalid, ::6, nftables tables).
RICH_TPROXY = (
    *TPROXY_DUAL,
    *("-t", "1400", "-r", "144", "-c", "eth9", "-k", "eth7", "--drop-invalid"),
    *("--redirect-dns", "--dns-servers", "192.0.2.53,2001:db8::53"),
)
SWEEP_APPLIES = {
    "tproxy-dual": TPROXY_DUAL,
    "tproxy-rich": RICH_TPROXY,
    "redirect-dual": STANDARD_DUAL,
    "nft-tproxy-dual": (*TPROXY_DUAL, "--native-nftables"),
}
SWEEP_CLEANS = {
    "no-flags": (),
    "tproxy-only": ("-m", "TPROXY"),
    "standard": STANDARD,
}
# Policy routing of another owner: a fwmark rule whose table has no local default route, a
# rule by source, and a `local default dev lo` route in a table no rule uses.
FOREIGN_ROUTING = (
    ("-4", "rule", "add", "fwmark", "0x7", "lookup", "200", "priority", "100"),
    ("-6", "rule", "add", "fwmark", "0x7", "lookup", "200", "priority", "100"),
    ("-4", "route", "add", "blackhole", "default", "table", "200"),
    ("-6", "route", "add", "blackhole", "default", "table", "200"),
    ("-4", "rule", "add", "from", "192.0.2.77", "lookup", "201", "priority", "101"),
    ("-4", "route", "add", "local", "default", "dev", "lo", "table", "202"),
)
FOREIGN_NFT = """\
table inet foreign {
    chain out {
        type filter hook output priority 0;
        tcp dport 9011 accept
    }
}
"""


def add_foreign_state(topo: Topology, backend: str) -> None:
    """Foreign rules in all four tables of both families, foreign routing, a foreign nft table."""
    add_foreign_rules(topo, backend)
    for argv in FOREIGN_ROUTING:
        subprocess.run(["ip", "-n", topo.pod_ns, *argv], check=True, timeout=10)
    topo.exec(topo.pod_ns, ["nft", "-f", "-"], input=FOREIGN_NFT, check=True)


def assert_istio_state_present(state: dict[str, str], backend: str, applied: str) -> None:
    """What the apply under test must have installed (so that its removal means something)."""
    if applied.startswith("nft"):
        assert "table inet istio-proxy-nat" in state["nft"]
        assert "table inet istio-proxy-mangle" in state["nft"]
    else:
        for saver in (f"iptables-{backend}-save", f"ip6tables-{backend}-save"):
            assert ":ISTIO_INBOUND" in state[saver], state[saver]
    if "tproxy" in applied:
        mark, table = ("0x578", "144") if applied == "tproxy-rich" else ("0x539", "133")
        for family in "46":
            assert f"fwmark {mark} lookup {table}" in state[f"rules{family}"]
            assert f"local default dev lo table {table}" in state[f"routes{family}"]
    assert "::6/128" in state["lo"]


@backend_param
@pytest.mark.parametrize("applied", SWEEP_APPLIES)
@pytest.mark.parametrize("cleaned", SWEEP_CLEANS)
def test_clean_removes_everything_whatever_flags(
    topology: Topology, backend: str, applied: str, cleaned: str
) -> None:
    add_foreign_state(topology, backend)
    before = namespace_state(topology)
    assert_ok(run_meshnet(topology, "istio-iptables", SWEEP_APPLIES[applied], backend=backend))
    assert_istio_state_present(namespace_state(topology), backend, applied)

    assert_ok(run_meshnet(topology, "clean", SWEEP_CLEANS[cleaned]))

    assert_same_state(namespace_state(topology), before)


@backend_param
def test_clean_dry_run_prints_the_removal_and_changes_nothing(
    topology: Topology, backend: str
) -> None:
    add_foreign_state(topology, backend)
    assert_ok(run_meshnet(topology, "istio-iptables", RICH_TPROXY, backend=backend))
    applied = namespace_state(topology)

    shown = run_meshnet(topology, "clean", ("--dry-run",))

    assert_ok(shown)
    assert_same_state(namespace_state(topology), applied)
    for family in ("iptables", "ip6tables"):
        assert f"# {family}-{backend}-restore --noflush" in shown.stdout
    for line in (
        "-D PREROUTING -p tcp -j ISTIO_INBOUND",
        "-D OUTPUT -j ISTIO_OUTPUT_DNS",
        "-D PREROUTING -i eth9 -j RETURN",
        "-X ISTIO_DIVERT",
        "-X ISTIO_TPROXY",
        "ip -6 route del local default dev lo table 144",
        "ip -6 addr del ::6/128 dev lo",
    ):
        assert line in shown.stdout.splitlines(), f"{line!r} not in\n{shown.stdout}"
    rule_lines = [line for line in shown.stdout.splitlines() if " rule del " in line]
    assert len(rule_lines) == 2 and all("fwmark 0x578 lookup 144" in r for r in rule_lines)
    assert "FOREIGN" not in shown.stdout and "lookup 200" not in shown.stdout


def test_clean_dry_run_of_a_clean_namespace_says_so(topology: Topology) -> None:
    shown = run_meshnet(topology, "clean", ("--dry-run",))

    assert_ok(shown)
    assert shown.stdout.startswith("# nothing to remove")


@backend_param
def test_cleanup_only_keeps_istios_flag_scoped_semantics(topology: Topology, backend: str) -> None:
    """istio-iptables --cleanup-only removes only what its own flags install, as Istio does."""
    flags = (*STANDARD, "-m", "TPROXY")
    assert_ok(run_meshnet(topology, "istio-iptables", flags, backend=backend))

    assert_ok(run_meshnet(topology, "istio-iptables", ("--cleanup-only",), backend=backend))

    left = namespace_state(topology)[f"iptables-{backend}-save"]
    assert ":ISTIO_DIVERT" in left and ":ISTIO_TPROXY" in left, left


# --------------------------------------------------------------------------- 4. detection


def test_autodetect_uses_legacy_where_legacy_holds_rules(topology: Topology) -> None:
    topology.exec(
        topology.pod_ns,
        ["iptables-legacy-restore", "--noflush", "--wait=30"],
        input=FOREIGN_RULES,
        check=True,
    )

    assert_ok(run_meshnet(topology, "istio-iptables", STANDARD_DUAL))

    saves = netfilter_state(topology)
    assert "ISTIO_INBOUND" in saves["iptables-legacy-save"]
    assert "ISTIO" not in saves["iptables-nft-save"]
    # Each family is detected on its own (Istio's DetectIptablesVersion): no IPv6 legacy rules.
    assert "ISTIO_INBOUND" in saves["ip6tables-nft-save"]
    assert "ISTIO" not in saves["ip6tables-legacy-save"]
    verified = run_meshnet(topology, "verify", STANDARD_DUAL)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_autodetect_picks_nft_in_a_clean_namespace(topology: Topology) -> None:
    assert_ok(run_meshnet(topology, "istio-iptables", STANDARD_DUAL))

    saves = netfilter_state(topology)
    assert "ISTIO_INBOUND" in saves["iptables-nft-save"]
    assert "ISTIO_INBOUND" in saves["ip6tables-nft-save"]
    # Not even an empty table: detection does not probe legacy when it holds no rules.
    assert saves["iptables-legacy-save"] == ""
    assert saves["ip6tables-legacy-save"] == ""


# --------------------------------------------------------------------------- 5. faults


@backend_param
@pytest.mark.parametrize("start", ["foreign-rules", "empty"])
def test_ipv6_restore_failure_rolls_back_ipv4(
    topology: Topology, tmp_path: Path, backend: str, start: str
) -> None:
    env = failing_ipv6_restore(topology, tmp_path, backend)
    if start == "foreign-rules":
        add_foreign_rules(topology, backend)
    before = namespace_state(topology)

    result = run_meshnet(topology, "istio-iptables", STANDARD_DUAL, backend=backend, env=env)

    assert result.returncode == 1, result.stderr
    assert f"ip6tables-{backend}-restore --noflush" in result.stderr
    assert "injected failure from the test wrapper" in result.stderr
    # The IPv4 rules were live when the IPv6 restore failed: the rollback had work to do.
    assert "ISTIO_INBOUND" in Path(env["MNT_SEEN_V4"]).read_text()
    after = namespace_state(topology)
    if start == "foreign-rules":
        assert_same_state(without_nft(after), without_nft(before))
    else:
        assert_no_rules_left(after, before)


@backend_param
def test_failed_reconcile_puts_the_previous_rules_back(
    topology: Topology, tmp_path: Path, backend: str
) -> None:
    assert_ok(run_meshnet(topology, "istio-iptables", STANDARD_DUAL, backend=backend))
    applied = namespace_state(topology)
    env = failing_ipv6_restore(topology, tmp_path, backend)

    result = run_meshnet(
        topology,
        "istio-iptables",
        *(STANDARD_DUAL, "-d", "15090,15021"),
        "--reconcile",
        backend=backend,
        env=env,
    )

    assert result.returncode == 1, result.stderr
    assert "injected failure from the test wrapper" in result.stderr
    # Guardrails in, old rules out, new IPv4 rules in: that is what had to be undone.
    seen_v4 = Path(env["MNT_SEEN_V4"]).read_text()
    assert "-j DROP" in seen_v4 and "--dport 15020" not in seen_v4
    # The guardrails' filter table stays, empty (as after a successful Istio reconcile).
    assert_no_rules_left(namespace_state(topology), applied)


def test_route_failure_leaves_namespace_as_found(topology: Topology) -> None:
    add_foreign_rules(topology, "nft")
    # With lo down, ::6, both `ip rule`s and the IPv4 local route are accepted and the IPv6
    # local route is refused (ENETDOWN): the failure comes after routing state was added.
    topology.exec(topology.pod_ns, ["ip", "link", "set", "lo", "down"], check=True)
    before = namespace_state(topology)

    result = run_meshnet(topology, "istio-iptables", TPROXY_DUAL, backend="nft")

    assert result.returncode == 1, result.stderr
    assert "failed to add route" in result.stderr
    after = without_nft(namespace_state(topology))
    assert_same_state({k: after[k] for k in SAVERS}, {k: before[k] for k in SAVERS})  # rules: ok
    assert_same_state(after, without_nft(before))  # the routing state is not rolled back


@pytest.mark.parametrize("lock", ["xtables-lockfile", "cni-pod-lock"])
def test_legacy_waits_for_the_xtables_lock(topology: Topology, tmp_path: Path, lock: str) -> None:
    """iptables-legacy 1.8.9 locks $XTABLES_LOCKFILE, else /run/xtables.lock (the host's: not
    touched here); in CNI mode meshnet points it at the pod's namespace file."""
    if lock == "xtables-lockfile":
        lockfile = str(tmp_path / "xtables.lock")
        env, namespace, extra = {"XTABLES_LOCKFILE": lockfile}, None, ()
    else:
        lockfile = str(topology.pod_path)
        env, namespace, extra = None, lockfile, ("--cni-mode",)
    with holding_lock(lockfile, LOCK_HOLD):
        started = time.monotonic()
        result = run_meshnet(
            topology,
            "istio-iptables",
            STANDARD,
            *extra,
            backend="legacy",
            env=env,
            namespace=namespace,
        )
        waited = time.monotonic() - started

    assert_ok(result)
    assert waited >= LOCK_HOLD - 0.5, f"did not wait for the lock ({waited:.2f}s)"
    assert "ISTIO_INBOUND" in netfilter_state(topology)["iptables-legacy-save"]


@pytest.mark.parametrize("form", ["name", "path", "not-a-namespace"])
def test_missing_namespace_fails_and_creates_none(
    topology: Topology, tmp_path: Path, form: str
) -> None:
    missing = f"{NS_PREFIX}{secrets.token_hex(4)}-missing"
    target, message = {
        "name": (missing, f'network namespace "{missing}" not found'),
        "path": (str(netns_path(missing)), "not found"),
        "not-a-namespace": (str(tmp_path), "not a network namespace"),
    }[form]
    before = namespace_state(topology)
    # Started inside the pod namespace: a meshnet that ignored the missing namespace and
    # carried on where it runs would change the pod (caught below), never the host.
    argv = netns_argv(
        topology.pod_ns,
        [PYTHON, "-m", "meshnet", "istio-iptables", *STANDARD, "--network-namespace", target],
    )
    result = subprocess.run(  # fixed argument list, no shell
        argv, env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=30
    )

    assert result.returncode == 1, result.stderr
    assert target in result.stderr and message in result.stderr
    assert not netns_path(missing).exists()
    assert_same_state(namespace_state(topology), before)


@pytest.mark.parametrize("backend", [None, *BACKENDS])
def test_missing_iptables_binary_fails_and_changes_nothing(
    topology: Topology, tmp_path: Path, backend: str | None
) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    before = namespace_state(topology)

    result = run_meshnet(
        topology, "istio-iptables", STANDARD, backend=backend, env={"PATH": str(empty_bin)}
    )

    assert result.returncode == 1, result.stderr
    assert "not found in PATH" in result.stderr
    assert (f"iptables-{backend}" if backend else "iptables") in result.stderr
    assert_same_state(namespace_state(topology), before)


@pytest.mark.parametrize(
    ("flags", "code", "named"),
    [
        ((*STANDARD, "-p", "0"), 1, "'0' for -p/--envoy-port"),
        ((*STANDARD, "-b", "80,x"), 1, "'80,x' for -b/--istio-inbound-ports"),
        ((*STANDARD, "--no-such-flag"), 255, "--no-such-flag"),
        ((*STANDARD, "--output-format", "json"), 1, "--output-format 'json' only chooses"),
        ((*STANDARD, "--output-format", "nft"), 1, "add --dry-run"),
    ],
    ids=["port-0", "bad-port-list", "unknown-flag", "format-without-dry-run", "nft-format"],
)
def test_bad_arguments_fail_and_change_nothing(
    topology: Topology, flags: tuple[str, ...], code: int, named: str
) -> None:
    before = namespace_state(topology)

    result = run_meshnet(topology, "istio-iptables", flags, backend="nft")

    assert result.returncode == code, result.stderr
    assert named in result.stderr
    assert_same_state(namespace_state(topology), before)


# --------------------------------------------------------------------------- 6. validation


VALIDATE_COMMANDS = {
    "validate": ("validate",),
    "run-validation": ("istio-iptables", "--run-validation", "--skip-rule-apply"),
}
validate_param = pytest.mark.parametrize("how", VALIDATE_COMMANDS)


@backend_param
@validate_param
def test_validation_passes_as_proxy_uid_after_apply(
    topology: Topology, backend: str, how: str
) -> None:
    assert_ok(run_meshnet(topology, "istio-iptables", STANDARD, backend=backend))
    applied = namespace_state(topology)

    result = run_in_pod_as_proxy(topology, [*VALIDATE_COMMANDS[how], *STANDARD])

    assert_ok(result)
    assert_same_state(namespace_state(topology), applied)


def assert_validation_failure_explained(result: subprocess.CompletedProcess[str]) -> None:
    """Exit 126 and one line saying what was checked and what to do."""
    assert result.returncode == 126, result.stderr
    assert "validation failed: a connection from uid 1337 gid 1337 to 127.0.0.6:15002" in (
        result.stderr
    )
    assert "`meshnet istio-iptables`" in result.stderr and "`meshnet verify`" in result.stderr


@validate_param
def test_validation_fails_as_proxy_uid_without_rules(topology: Topology, how: str) -> None:
    before = namespace_state(topology)

    result = run_in_pod_as_proxy(
        topology, [*VALIDATE_COMMANDS[how], *STANDARD, "--probe-timeout", "2s"]
    )

    assert_validation_failure_explained(result)
    assert_same_state(namespace_state(topology), before)


@backend_param
@validate_param
def test_validation_as_root_passes_with_rules(topology: Topology, backend: str, how: str) -> None:
    assert_ok(run_meshnet(topology, "istio-iptables", STANDARD, backend=backend))
    applied = namespace_state(topology)

    result = run_meshnet(topology, VALIDATE_COMMANDS[how][0], STANDARD, *VALIDATE_COMMANDS[how][1:])

    assert_ok(result)
    assert "client='uid 1337 gid 1337'" in result.stderr
    assert_same_state(namespace_state(topology), applied)


@validate_param
def test_validation_as_root_fails_without_rules(topology: Topology, how: str) -> None:
    before = namespace_state(topology)

    result = run_meshnet(
        topology,
        VALIDATE_COMMANDS[how][0],
        STANDARD,
        *VALIDATE_COMMANDS[how][1:],
        "--probe-timeout",
        "2s",
    )

    assert_validation_failure_explained(result)
    assert_same_state(namespace_state(topology), before)


# --------------------------------------------------------------------------- 7. verify


@backend_param
def test_verify_names_a_rule_deleted_by_hand(topology: Topology, backend: str) -> None:
    assert_ok(run_meshnet(topology, "istio-iptables", STANDARD, backend=backend))
    intact = run_meshnet(topology, "verify", STANDARD, backend=backend)
    assert intact.returncode == 0, intact.stdout + intact.stderr
    assert "in sync" in intact.stdout

    delete = ["-t", "nat", "-D", "ISTIO_INBOUND", "-p", "tcp", "--dport", "15021", "-j", "RETURN"]
    topology.exec(topology.pod_ns, [f"iptables-{backend}", *delete, "--wait"], check=True)
    drifted = run_meshnet(topology, "verify", STANDARD, backend=backend)

    assert drifted.returncode == 3, drifted.stdout + drifted.stderr
    named = [line for line in drifted.stdout.splitlines() if "--dport 15021 -j RETURN" in line]
    assert named and all("missing" in line and "ISTIO_INBOUND" in line for line in named), (
        drifted.stdout
    )


@backend_param
@pytest.mark.parametrize("flag", ["--output", "--output-format"])
def test_verify_json_names_the_backend(topology: Topology, backend: str, flag: str) -> None:
    assert_ok(run_meshnet(topology, "istio-iptables", STANDARD_DUAL, backend=backend))

    in_sync = run_meshnet(topology, "verify", STANDARD_DUAL, flag, "json", backend=backend)
    delete = ["-t", "nat", "-D", "ISTIO_INBOUND", "-p", "tcp", "--dport", "15021", "-j", "RETURN"]
    topology.exec(topology.pod_ns, [f"ip6tables-{backend}", *delete, "--wait"], check=True)
    drifted = run_meshnet(topology, "verify", STANDARD_DUAL, flag, "json", backend=backend)

    assert in_sync.returncode == 0, in_sync.stderr
    backends = {"ipv4": f"iptables-{backend}", "ipv6": f"ip6tables-{backend}"}
    assert json.loads(in_sync.stdout) == {"in_sync": True, "backend": backends, "differences": []}
    assert drifted.returncode == 3, drifted.stderr
    report = json.loads(drifted.stdout)
    assert report["in_sync"] is False and report["backend"] == backends
    assert report["differences"] and all(d.startswith("ipv6 ") for d in report["differences"])
    assert any("--dport 15021 -j RETURN" in d for d in report["differences"])


def test_verify_text_names_the_backend(topology: Topology) -> None:
    assert_ok(run_meshnet(topology, "istio-iptables", STANDARD, backend="legacy"))

    result = run_meshnet(topology, "verify", STANDARD, backend="legacy")

    assert result.returncode == 0, result.stderr
    assert "in sync" in result.stdout and "ipv4 iptables-legacy" in result.stdout
