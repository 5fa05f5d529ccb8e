"""meshnet.cli.argv reads a command line as click does, or leaves it to click."""

from __future__ import annotations

import click
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnet.cli import argv
from meshnet.cli.app import istio_iptables, verify
from meshnet.config.flags import EXTENSIONS, ISTIO_FLAGS, LOG_FLAGS
from tests.support.cli import STANDARD_ARGS, meshnet

FLAGS = ISTIO_FLAGS + EXTENSIONS + LOG_FLAGS
NAMES = sorted({name for f in FLAGS for name in (f.long, f.short) if name} | {"--output"})
VALUES = st.sampled_from(
    [
        "",
        "15001",
        "*",
        "-",
        "-x",
        "--dry-run",
        "true",
        "a=b",
        "--",
        "-p",
        "a\nb",
        "'; rm -rf /",
        "$(id)",
        "a b",
        "é",
        "-A OUTPUT -j ACCEPT",
        "=",
        "-=x",
    ]
)
TOKEN = st.one_of(
    st.sampled_from(NAMES),
    st.builds(lambda n, v: f"{n}={v}", st.sampled_from(NAMES), VALUES),
    st.builds(lambda n, v: f"{n}{v}", st.sampled_from(["-p", "-n", "-z"]), VALUES),
    VALUES,
)


def click_params(command: click.Command, args: list[str]) -> dict[str, object] | None:
    try:
        return command.make_context(command.name, list(args)).params
    except click.exceptions.ClickException:
        return None


@settings(max_examples=400, deadline=None)
@given(st.lists(TOKEN, max_size=8))
def test_every_line_read_without_click_reads_as_click_reads_it(args: list[str]) -> None:
    fast = argv.parse(args)
    if fast is not None:
        assert fast == click_params(istio_iptables, args)


@settings(max_examples=200, deadline=None)
@given(st.lists(TOKEN, max_size=8))
def test_extra_flags_read_as_click_reads_them(args: list[str]) -> None:
    fast = argv.parse(args, extra=("--output",))
    if fast is not None:
        expected = click_params(verify, args)
        # click checks --output's choice; the entry point checks it after this reader.
        if expected is not None:
            assert fast == expected
        else:
            assert fast["output"] not in ("text", "json", None)


def test_the_standard_injection_args_are_read_without_click() -> None:
    fast = argv.parse(list(STANDARD_ARGS))
    assert fast is not None
    assert fast == click_params(istio_iptables, list(STANDARD_ARGS))
    assert (fast["envoy_port"], fast["service_exclude_cidr"], fast["dry_run"]) == (
        "15001",
        "",
        None,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["-h"],
        ["extra"],
        ["-p"],  # click's "requires an argument"
        ["-p15001"],
        ["-p=15001"],
        ["--dry-run", "false"],  # click takes the word as the bool's value
        ["--dry-run=-x"],
        ["--no-such-flag"],
        ["--"],
    ],
)
def test_lines_left_to_click(args: list[str]) -> None:
    assert argv.parse(args) is None


def test_bool_flags_alone_or_before_another_flag_are_true() -> None:
    fast = argv.parse(["--dry-run", "-n", "--redirect-dns", "-p", "1"])
    assert fast is not None
    assert (fast["dry_run"], fast["redirect_dns"], fast["envoy_port"]) == ("true", "true", "1")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["istio-iptables", "-p", "0", "--dry-run"], 1, "-p/--envoy-port"),
        (["istio-iptables", "-p15001x", "--dry-run"], 1, "-p/--envoy-port"),
        (["istio-iptables", "-i", "10.0.0.0/8\n-A OUTPUT -j ACCEPT", "--dry-run"], 1, "-i/"),
        (["istio-iptables", "--istio-service-cidr=10.0.0.0/8\n-A X", "--dry-run"], 1, "-i/"),
        (["verify", "--output", "xml"], 255, "'xml' is not one of"),
        (["verify", "--output-format", "xml"], 255, "'xml' is not one of"),
    ],
)
def test_bad_values_fail_alike_with_and_without_click(
    args: list[str], code: int, message: str
) -> None:
    done = meshnet(args)
    assert done.returncode == code, done.stderr
    assert message in done.stderr
