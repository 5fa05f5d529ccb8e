"""The `meshnet` command line as a user meets it: help, version, completion, error format,
output options. No root and no namespace: nothing here applies rules."""

from __future__ import annotations

import json
import re

import pytest

from meshnet.cni.install.settings import ENV_OPTIONS
from meshnet.config.options import OUTPUT_FORMATS
from tests.support.cli import STANDARD_ARGS, meshnet
from tests.support.repo import REPO

NO_IPV6 = ("--enable-ipv6", "false")
EXPLAIN_PROBE = ("--probe", "in tcp dst=192.0.2.1:8080")


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag: str) -> None:
    result = meshnet([flag])

    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"meshnet, version \S+\n", result.stdout), result.stdout


def test_bare_meshnet_prints_help_and_exits_0() -> None:
    result = meshnet([])

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: meshnet")
    listed = result.stdout.split("\nCommands:\n", 1)[1].splitlines()
    commands = ["clean", "cni", "demo", "explain", "istio-iptables", "validate", "verify"]
    assert [line.split()[0] for line in listed] == commands


def test_bash_completion_as_the_readme_says() -> None:
    readme = (REPO / "README.md").read_text()
    assert "_MESHNET_COMPLETE=bash_source meshnet" in readme

    result = meshnet([], env={"_MESHNET_COMPLETE": "bash_source"})

    assert result.returncode == 0, result.stderr
    assert "_meshnet_completion" in result.stdout
    assert "complete " in result.stdout


def test_completion_offers_the_commands() -> None:
    env = {"_MESHNET_COMPLETE": "bash_complete", "COMP_WORDS": "meshnet cl", "COMP_CWORD": "1"}

    result = meshnet([], env=env)

    assert result.returncode == 0, result.stderr
    assert result.stdout == "plain,clean\n"


def test_cni_install_help_lists_its_environment_variables() -> None:
    result = meshnet(["cni", "install", "--help"])

    assert result.returncode == 0, result.stderr
    assert "Environment variables" in result.stdout
    for option in ENV_OPTIONS:
        assert option.name in result.stdout


# --------------------------------------------------------------------------- error format


def json_error_lines(stderr: str) -> list[dict[str, object]]:
    """Every stderr line parsed as JSON (a line that is not JSON fails the test)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "no error line at all"
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line on stderr: {line!r}")
    return records


@pytest.mark.parametrize(
    ("args", "env", "code", "named"),
    [
        (["--log-format", "json", "--no-such-flag"], {}, 255, "--no-such-flag"),
        (["--no-such-flag", "--log-format", "json"], {}, 255, "--no-such-flag"),
        (["--no-such-flag", "--log-format=json"], {}, 255, "--no-such-flag"),
        (["--no-such-flag", "--log_as_json"], {}, 255, "--no-such-flag"),
        (["--dry-run=maybe", "--log_as_json=true"], {}, 255, "--dry-run"),
        (["-p"], {"MESHNET_LOG_FORMAT": "json"}, 255, "-p"),
        (["-p", "0", "--log-format", "json"], {}, 1, "-p/--envoy-port"),
        (["--log-format", "json", "-x", "*"], {}, 1, "OUTBOUND_IP_RANGES_EXCLUDE"),
    ],
    ids=[
        "usage-flag-first",
        "usage-flag-last",
        "usage-equals",
        "usage-log-as-json",
        "bad-bool",
        "usage-env",
        "bad-value",
        "bad-value-flag-first",
    ],
)
def test_json_log_format_applies_to_every_error_line(
    args: list[str], env: dict[str, str], code: int, named: str
) -> None:
    result = meshnet(["istio-iptables", "-n", *NO_IPV6, *args], env=env)

    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    records = json_error_lines(result.stderr)
    errors = [r for r in records if r.get("level") == "error"]
    assert len(errors) == 1, records
    assert named in str(errors[0]["event"])


def test_text_usage_error_is_one_log_line_naming_the_flag() -> None:
    result = meshnet(["clean", "--no-such-flag"])

    assert result.returncode == 255
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "[error" in lines[0] and "--no-such-flag" in lines[0]
    assert "meshnet clean --help" in lines[0]


# --------------------------------------------------------------------------- output options


def test_explain_accepts_output_format_as_an_alias_of_output() -> None:
    args = ["explain", *STANDARD_ARGS, *NO_IPV6, *EXPLAIN_PROBE]

    alias = meshnet([*args, "--output-format", "json"])
    plain = meshnet([*args, "--output", "json"])

    assert alias.returncode == 0, alias.stderr
    assert alias.stdout == plain.stdout
    assert json.loads(alias.stdout)[0]["probe"]["dst"] == "192.0.2.1:8080"


def test_explain_output_format_outside_text_json_is_a_usage_error() -> None:
    result = meshnet(
        ["explain", *STANDARD_ARGS, *NO_IPV6, *EXPLAIN_PROBE, "--output-format", "dot"]
    )

    assert result.returncode == 255
    assert "--output-format" in result.stderr and "'dot'" in result.stderr


def test_readme_output_format_lists_match_the_code() -> None:
    readme = (REPO / "README.md").read_text()
    lists = re.findall(r"--output-format`? `?([a-z]+(?:\\?\|[a-z]+)+)", readme)

    assert lists, "README lists no --output-format values"
    for found in lists:
        assert found.replace("\\", "").split("|") == list(OUTPUT_FORMATS), found
    for name in OUTPUT_FORMATS:
        assert f"`{name}`" in readme, f"README does not describe --output-format {name}"
