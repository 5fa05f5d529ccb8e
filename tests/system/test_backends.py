"""Backends, namespaces and routes against the real tools and kernel (root; own namespaces only)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from meshnet.apply import routes
from meshnet.apply.iptables_tool import LOCK_WAIT_FLAG, IptablesRunner, detect
from meshnet.errors import BackendError, NamespaceError, RouteError
from meshnet.host import netns, proc
from meshnet.state.iptables_save import diff_states, parse_save, verify_state
from tests.support.netstate import normalize_save

Exec = Callable[..., subprocess.CompletedProcess[str]]

FAMILIES = {"ipv4": False, "ipv6": True}
BACKENDS = ("legacy", "nft")
MARK, TABLE = 1337, 133
NAT_CHAINS = ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")

RULES_V4 = """\
* mangle
-N ISTIO_DIVERT
-A ISTIO_DIVERT -j MARK --set-mark 1337
-A ISTIO_DIVERT -j ACCEPT
COMMIT
* nat
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-I PREROUTING 1 -i eth9 -j RETURN
COMMIT
"""
RULES = {"ipv4": RULES_V4, "ipv6": RULES_V4.replace("127.0.0.6/32", "::6/128")}

# Line 4 has an invalid port, which both backends report on that line. (A jump to a missing
# chain is reported by nft on the COMMIT line, by legacy on the rule's line.)
BAD_NAT = (
    "* nat\n-N ISTIO_OUTPUT\n-A ISTIO_OUTPUT -j RETURN\n"
    "-A ISTIO_OUTPUT -p tcp --dport 99999 -j RETURN\nCOMMIT\n"
)


def prefix(family: str) -> str:
    return "ip6tables" if FAMILIES[family] else "iptables"


def istio_chains(save_text: str) -> list[tuple[str, str]]:
    return parse_save(save_text).istio_chains()


@pytest.fixture(params=list(FAMILIES))
def family(request: pytest.FixtureRequest, require_tools: Callable[..., None]) -> str:
    name: str = request.param
    require_tools(*(f"{prefix(name)}-{b}{s}" for b in BACKENDS for s in ("", "-save", "-restore")))
    return name


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


# --- detection ------------------------------------------------------------------------------


def test_detect_picks_nft_in_a_clean_namespace(namespace: str, family: str) -> None:
    with netns.entered(namespace):
        found = detect(FAMILIES[family])
    assert found.binary == f"{prefix(family)}-nft"
    assert (found.save, found.restore) == (f"{found.binary}-save", f"{found.binary}-restore")
    assert not found.legacy
    assert not found.existing_rules
    assert not found.needs_lock
    assert found.version == ()  # an empty nft save has no header, and nf_tables never locks


def test_detect_reads_the_nft_version_from_the_save_header(namespace: str, family: str) -> None:
    with netns.entered(namespace):
        detect(FAMILIES[family])  # the kernel probe leaves a nat table: the save has a header
        found = detect(FAMILIES[family])
    assert found.binary == f"{prefix(family)}-nft"
    assert found.version >= (1, 4)


def test_detect_picks_legacy_when_legacy_has_rules(
    namespace: str, family: str, ns_exec: Exec
) -> None:
    added = ns_exec(f"{prefix(family)}-legacy", "-t", "filter", "-A", "INPUT", "-j", "ACCEPT")
    assert added.returncode == 0, added.stderr
    with netns.entered(namespace):
        found = detect(FAMILIES[family])
    assert found.binary == f"{prefix(family)}-legacy"
    assert found.legacy
    assert found.existing_rules
    assert found.needs_lock  # legacy 1.8.x takes the xtables lock


def test_second_detection_is_not_fooled_by_the_first_probe(namespace: str, family: str) -> None:
    # Istio's ">= 3 lines" heuristic sees the empty nat table its own legacy probe leaves and
    # picks legacy on every later run; meshnet counts rules, so a re-run stays on nft.
    with netns.entered(namespace):
        first = detect(FAMILIES[family])
        second = detect(FAMILIES[family])
    assert (first.legacy, second.legacy) == (False, False)
    assert not second.existing_rules


@pytest.mark.parametrize("force", BACKENDS)
def test_forced_backend_is_used(namespace: str, family: str, force: str) -> None:
    with netns.entered(namespace):
        found = detect(FAMILIES[family], force=force)
    assert found.binary == f"{prefix(family)}-{force}"
    assert found.legacy == (force == "legacy")


def test_the_kernel_probe_leaves_an_empty_nat_input_chain(namespace: str, family: str) -> None:
    # Istio's -A/-D probe leaves the nat table with an empty INPUT chain; so does meshnet's.
    with netns.entered(namespace):
        found = detect(FAMILIES[family])
        saved = proc.run([found.save], timeout=10).stdout
    # Only the nat table, only built-in chains with their policy, no rule (iptables-nft
    # versions differ in which of its base chains they create).
    lines = normalize_save(saved).splitlines()
    assert (lines[0], lines[-1]) == ("*nat", "COMMIT"), lines
    assert ":INPUT ACCEPT [0:0]" in lines[1:-1], lines
    assert set(lines[1:-1]) <= {f":{c} ACCEPT [0:0]" for c in NAT_CHAINS}, lines


def test_a_probe_rule_left_by_a_killed_run_is_removed(
    namespace: str, family: str, ns_exec: Exec
) -> None:
    added = ns_exec(
        f"{prefix(family)}-nft", "-t", "nat", "-A", "INPUT", "-p", "255", "-j", "RETURN"
    )
    assert added.returncode == 0, added.stderr
    with netns.entered(namespace):
        found = detect(FAMILIES[family])
        saved = proc.run([found.save], timeout=10).stdout
    assert found.binary == f"{prefix(family)}-nft"
    assert not found.existing_rules
    assert "-p 255" not in saved


def test_a_binary_without_kernel_support_is_passed_over(
    namespace: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # An iptables-nft whose every write fails as on a kernel without nf_tables nat: auto
    # detection moves on to the plain binary, as Istio's DetectIptablesVersion does.
    for name in ("iptables-nft", "iptables-nft-save", "iptables-nft-restore"):
        fake = tmp_path / name
        body = "exit 0" if name.endswith("-save") else "echo 'Table does not exist' >&2; exit 1"
        fake.write_text(f"#!/bin/sh\n{body}\n")
        fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with netns.entered(namespace):
        found = detect(False)
    assert found.binary == "iptables"


def test_unknown_forced_backend_is_rejected() -> None:
    with pytest.raises(BackendError, match='iptables binary "bogus" unsupported'):
        detect(False, force="bogus")


def test_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BackendError, match="iptables binary iptables-nft not found in PATH"):
        detect(False, force="nft")
    with pytest.raises(BackendError, match="iptables binary ip6tables not found in PATH"):
        detect(True)  # auto: legacy and nft are skipped, the plain binary's error is raised


# --- restore and save -----------------------------------------------------------------------


def test_restore_and_save_round_trip(namespace: str, family: str, backend: str) -> None:
    text = RULES[family]
    with netns.entered(namespace):
        runner = IptablesRunner(detect(FAMILIES[family], force=backend))
        runner.restore(text)
        saved = runner.save()
        verdict = verify_state(text, saved, runner.check)
        drift = diff_states(parse_save(runner.canonicalize(text)), parse_save(saved))
    assert sorted(istio_chains(saved)) == [
        ("mangle", "ISTIO_DIVERT"),
        ("nat", "ISTIO_INBOUND"),
        ("nat", "ISTIO_OUTPUT"),
        ("nat", "ISTIO_REDIRECT"),
    ]
    assert parse_save(saved).rules("nat", "PREROUTING")[0] == "-A PREROUTING -i eth9 -j RETURN"
    assert verdict == (True, False)
    assert drift == []


def test_backends_do_not_see_each_others_rules(
    namespace: str, family: str, backend: str, ns_exec: Exec
) -> None:
    other = "nft" if backend == "legacy" else "legacy"
    with netns.entered(namespace):
        IptablesRunner(detect(FAMILIES[family], force=backend)).restore(RULES[family])
    assert istio_chains(ns_exec(f"{prefix(family)}-{other}-save").stdout) == []


def test_restore_failure_reports_the_tool_message_and_applies_nothing(
    namespace: str, family: str, backend: str
) -> None:
    with netns.entered(namespace):
        runner = IptablesRunner(detect(FAMILIES[family], force=backend))
        with pytest.raises(BackendError) as failure:
            runner.restore(BAD_NAT)
        saved = runner.save()
    message = str(failure.value)
    assert message.startswith(f"`{runner.binary.restore} --noflush")
    assert "xtables parameter problem" in message
    assert "invalid port/service `99999' specified" in message
    assert "line: 4" in message
    assert "\n" not in message
    assert istio_chains(saved) == []


def test_restore_keeps_tables_committed_before_a_failing_one(
    namespace: str, family: str, backend: str
) -> None:
    # Not atomic across tables (both backends): callers must roll back on failure themselves.
    text = "* mangle\n-N ISTIO_DIVERT\n-A ISTIO_DIVERT -j ACCEPT\nCOMMIT\n" + BAD_NAT
    with netns.entered(namespace):
        runner = IptablesRunner(detect(FAMILIES[family], force=backend))
        with pytest.raises(BackendError):
            runner.restore(text)
        saved = runner.save()
    assert istio_chains(saved) == [("mangle", "ISTIO_DIVERT")]


def test_reapplying_existing_chains_fails_as_in_istio(
    namespace: str, family: str, backend: str
) -> None:
    with netns.entered(namespace):
        runner = IptablesRunner(detect(FAMILIES[family], force=backend))
        runner.restore(RULES[family])
        with pytest.raises(BackendError, match="line 2 failed"):
            runner.restore(RULES[family])


def test_restore_replace_puts_a_snapshot_back(
    namespace: str, family: str, backend: str, ns_exec: Exec
) -> None:
    binary = f"{prefix(family)}-{backend}"
    ns_exec(binary, "-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "ACCEPT")
    with netns.entered(namespace):
        runner = IptablesRunner(detect(FAMILIES[family], force=backend))
        snapshot = runner.save()
        runner.restore(RULES[family])
        untouched = "* filter\n-A INPUT -j ACCEPT\nCOMMIT\n"
        runner.restore(untouched)
        runner.restore_replace(snapshot + "*mangle\nCOMMIT\n")
        after = parse_save(runner.save())
    assert after.istio_chains() == []
    assert after.rules("nat", "OUTPUT") == ("-A OUTPUT -p udp -j ACCEPT",)
    assert after.rules("filter", "INPUT") == ("-A INPUT -j ACCEPT",)  # not in the input: kept


def test_run_and_check_report_exit_status_without_raising(namespace: str, family: str) -> None:
    with netns.entered(namespace):
        runner = IptablesRunner(detect(FAMILIES[family], force="nft"))
        runner.restore(RULES[family])
        present = ("-t", "nat", "-C", "ISTIO_REDIRECT", "-p", "tcp", "-j", "REDIRECT")
        assert runner.check((*present, "--to-ports", "15001"))
        assert not runner.check((*present, "--to-ports", "15002"))
        assert runner.run(["-t", "nat", "-F", "ISTIO_NOPE"]).returncode != 0


def test_canonicalize_respells_like_save_and_touches_nothing(namespace: str, family: str) -> None:
    with netns.entered(namespace):
        runner = IptablesRunner(detect(FAMILIES[family]))
        canonical = runner.canonicalize(RULES[family])
        saved = runner.save()
    assert "-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN" in canonical
    assert "-A ISTIO_DIVERT -j MARK --set-xmark 0x539/0xffffffff" in canonical
    assert istio_chains(saved) == []


# --- locks ----------------------------------------------------------------------------------


def test_legacy_writes_wait_for_the_lock_and_nft_never_does(namespace: str, family: str) -> None:
    with netns.entered(namespace):
        legacy = IptablesRunner(detect(FAMILIES[family], force="legacy"))
        nft = IptablesRunner(detect(FAMILIES[family], force="nft"))
        legacy_args = legacy.run(["-t", "filter", "-S"]).args
        nft_args = nft.run(["-t", "filter", "-S"]).args
    assert legacy_args[-1] == LOCK_WAIT_FLAG
    assert LOCK_WAIT_FLAG not in nft_args


def test_cni_mode_uses_a_pod_scoped_lock_file(namespace: str, family: str, tmp_path: Path) -> None:
    legacy_lock, nft_lock = tmp_path / "legacy.lock", tmp_path / "nft.lock"
    with netns.entered(namespace):
        legacy = detect(FAMILIES[family], force="legacy", lockfile=str(legacy_lock))
        IptablesRunner(legacy, lockfile=str(legacy_lock)).restore(RULES[family])
        nft = detect(FAMILIES[family], force="nft", lockfile=str(nft_lock))
        IptablesRunner(nft, lockfile=str(nft_lock)).restore(RULES[family])
    assert legacy_lock.exists()  # legacy >= 1.8.6 honours XTABLES_LOCKFILE
    assert not nft_lock.exists()  # nf_tables takes no lock at all


# --- namespaces -----------------------------------------------------------------------------


def test_entered_moves_into_the_namespace_and_back(namespace: str) -> None:
    host = os.stat("/proc/self/ns/net").st_ino
    target = os.stat(netns.resolve(namespace)).st_ino
    with netns.entered(namespace):
        inside = os.stat("/proc/self/ns/net").st_ino
    assert (inside, os.stat("/proc/self/ns/net").st_ino) == (target, host)


def test_entered_accepts_a_path(namespace: str) -> None:
    path = f"/var/run/netns/{namespace}"
    with netns.entered(path):
        assert netns.current_inode() == os.stat(path).st_ino


def test_entered_restores_the_namespace_after_an_error(namespace: str) -> None:
    host = netns.current_inode()
    with pytest.raises(RuntimeError), netns.entered(namespace):
        raise RuntimeError("boom")
    assert netns.current_inode() == host


def test_subprocesses_started_inside_inherit_the_namespace(namespace: str) -> None:
    with netns.entered(namespace):
        child = subprocess.run(
            ["readlink", "/proc/self/ns/net"], capture_output=True, text=True, timeout=10
        )
    assert child.stdout.strip() == f"net:[{os.stat(netns.resolve(namespace)).st_ino}]"


def test_entering_a_missing_namespace_raises_and_creates_nothing(
    missing_namespace_name: str,
) -> None:
    host = netns.current_inode()
    with pytest.raises(NamespaceError, match=f'network namespace "{missing_namespace_name}" not'):
        with netns.entered(missing_namespace_name):
            pytest.fail("entered a namespace that does not exist")
    assert not Path(netns.resolve(missing_namespace_name)).exists()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    assert missing_namespace_name not in listed.stdout
    assert netns.current_inode() == host


def test_entering_a_file_that_is_not_a_namespace_is_refused(tmp_path: Path) -> None:
    host = netns.current_inode()
    plain = tmp_path / "not-a-netns"
    plain.write_text("")
    with pytest.raises(NamespaceError, match="not a network namespace"):
        with netns.entered(str(plain)):
            pytest.fail("entered a plain file")
    assert netns.current_inode() == host


def test_run_isolated_uses_a_private_empty_namespace(namespace: str) -> None:
    host = netns.current_inode()
    inode = netns.run_isolated(netns.current_inode)
    assert inode not in (host, os.stat(netns.resolve(namespace)).st_ino)
    assert netns.current_inode() == host


@pytest.mark.usefixtures("system")
def test_run_isolated_passes_errors_to_the_caller() -> None:
    def fail() -> None:
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        netns.run_isolated(fail)


# --- routes ---------------------------------------------------------------------------------


def rule_lines(ns_exec: Exec, ipv6: bool) -> list[str]:
    out = ns_exec("ip", "-6" if ipv6 else "-4", "rule", "show").stdout
    return [line for line in out.splitlines() if f"fwmark {MARK:#x} lookup {TABLE}" in line]


def route_lines(ns_exec: Exec, ipv6: bool) -> list[str]:
    out = ns_exec("ip", "-6" if ipv6 else "-4", "route", "show", "table", str(TABLE)).stdout
    return [line for line in out.splitlines() if line.startswith("local default dev lo")]


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "dual"])
def test_configure_tproxy_twice_gives_one_rule_and_one_route(
    namespace: str, ns_exec: Exec, ipv6: bool
) -> None:
    with netns.entered(namespace):
        routes.configure_tproxy(MARK, TABLE, ipv6)
        routes.configure_tproxy(MARK, TABLE, ipv6)
    expected_v6 = 1 if ipv6 else 0
    assert (len(rule_lines(ns_exec, False)), len(route_lines(ns_exec, False))) == (1, 1)
    assert (len(rule_lines(ns_exec, True)), len(route_lines(ns_exec, True))) == (
        expected_v6,
        expected_v6,
    )


def test_configure_tproxy_lets_the_kernel_choose_the_priority(
    namespace: str, ns_exec: Exec
) -> None:
    with netns.entered(namespace):
        routes.configure_tproxy(MARK, TABLE, ipv6=False)
    assert rule_lines(ns_exec, False)[0].startswith("32765:")  # as `ip rule add` and Istio


def test_configure_tproxy_keeps_an_identical_rule_added_by_ip(
    namespace: str, ns_exec: Exec
) -> None:
    ns_exec("ip", "rule", "add", "fwmark", str(MARK), "lookup", str(TABLE), "pref", "100")
    with netns.entered(namespace):
        routes.configure_tproxy(MARK, TABLE, ipv6=False)
    assert [line.split(":")[0] for line in rule_lines(ns_exec, False)] == ["100"]


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "dual"])
def test_remove_tproxy_removes_exactly_what_was_added(
    namespace: str, ns_exec: Exec, ipv6: bool
) -> None:
    ns_exec("ip", "rule", "add", "fwmark", str(MARK), "lookup", "134")
    ns_exec("ip", "rule", "add", "fwmark", "7", "lookup", str(TABLE))
    with netns.entered(namespace):
        routes.configure_tproxy(MARK, TABLE, ipv6)
        routes.remove_tproxy(MARK, TABLE, ipv6)
        routes.remove_tproxy(MARK, TABLE, ipv6)  # already gone: fine
    for family_is_v6 in (False, True):
        assert rule_lines(ns_exec, family_is_v6) == []
        assert route_lines(ns_exec, family_is_v6) == []
    others = ns_exec("ip", "rule", "show").stdout
    assert f"fwmark {MARK:#x} lookup 134" in others
    assert f"fwmark 0x7 lookup {TABLE}" in others


def test_configure_tproxy_with_lo_down_names_the_problem(namespace: str, ns_exec: Exec) -> None:
    # The IPv4 local route is accepted on a down lo; the IPv6 one is refused (ENETDOWN).
    ns_exec("ip", "link", "set", "lo", "down")
    with (
        netns.entered(namespace),
        pytest.raises(RouteError, match=r"failed to add route: network is down \(is 'lo' up\?\)"),
    ):
        routes.configure_tproxy(MARK, TABLE, ipv6=True)


def address_lines(ns_exec: Exec) -> list[str]:
    out = ns_exec("ip", "-6", "addr", "show", "dev", "lo").stdout
    return [line for line in out.splitlines() if "inet6 ::6/128" in line]


def test_ensure_ipv6_loopback_adds_the_address_once(namespace: str, ns_exec: Exec) -> None:
    with netns.entered(namespace):
        added = (routes.ensure_ipv6_loopback(), routes.ensure_ipv6_loopback())
    assert added == (True, False)
    assert len(address_lines(ns_exec)) == 1


def test_remove_ipv6_loopback_removes_it_once(namespace: str, ns_exec: Exec) -> None:
    with netns.entered(namespace):
        routes.ensure_ipv6_loopback()
        removed = (routes.remove_ipv6_loopback(), routes.remove_ipv6_loopback())
    assert removed == (True, False)
    assert address_lines(ns_exec) == []


def test_ipv6_loopback_error_uses_istio_wording(namespace: str, ns_exec: Exec) -> None:
    ns_exec("sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1")
    with (
        netns.entered(namespace),
        pytest.raises(RouteError, match="failed to add IPv6 inbound address: permission denied"),
    ):
        routes.ensure_ipv6_loopback()


def test_auto_detection_leaves_no_legacy_table_behind(namespace: str, family: str) -> None:
    # The legacy kernel probe would leave an empty legacy nat table (and iptables-nft-save's
    # "legacy tables present" warning) in a namespace where legacy is never chosen.
    with netns.entered(namespace):
        detect(FAMILIES[family])
        leftover = proc.run([f"{prefix(family)}-legacy-save"], timeout=10)
    assert leftover.stdout == ""
