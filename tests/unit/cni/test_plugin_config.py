"""The CNI plugin's pure parts, without root: the VERSION answer, netconf parsing and version
checks, the error JSON and codes, CNI_ARGS and the required variables."""

from __future__ import annotations

import json

import pytest

from meshnet.cni.plugin.main import Call, k8s_args, require_env, respond
from meshnet.errors import CniError

VERSION_OUTPUT = """\
{
    "cniVersion": "1.1.0",
    "supportedVersions": [
        "0.1.0",
        "0.2.0",
        "0.3.0",
        "0.3.1",
        "0.4.0",
        "1.0.0",
        "1.1.0"
    ]
}
"""


def _error(version: str, code: int, msg: str) -> tuple[str, int]:
    return json.dumps({"cniVersion": version, "code": code, "msg": msg}, indent=4) + "\n", 1


def test_version_needs_no_stdin() -> None:
    assert respond("", {"CNI_COMMAND": "VERSION"}) == (VERSION_OUTPUT, 0)


def test_no_command_prints_usage_on_stderr_only(capsys: pytest.CaptureFixture[str]) -> None:
    assert respond("{}", {}) == ("", 1)
    assert capsys.readouterr().err == (
        "CNI plugin meshnet-cni: supported versions "
        "0.1.0, 0.2.0, 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0\n"
    )


@pytest.mark.parametrize(
    ("stdin", "expected"),
    [
        ("", _error("1.1.0", 6, "failed to parse network configuration: "
                    "Expecting value: line 1 column 1 (char 0)")),
        ("[]", _error("1.1.0", 6, "failed to parse network configuration: not a JSON object")),
        ('{"cniVersion": "2.0.0"}',
         _error("1.1.0", 1, "incompatible CNI versions: config is '2.0.0', plugin supports "
                "['0.1.0', '0.2.0', '0.3.0', '0.3.1', '0.4.0', '1.0.0', '1.1.0']")),
        ('{"cniVersion": 1.0}',
         _error("1.1.0", 1, "incompatible CNI versions: config is '1.0', plugin supports "
                "['0.1.0', '0.2.0', '0.3.0', '0.3.1', '0.4.0', '1.0.0', '1.1.0']")),
    ],
)  # fmt: skip
def test_unreadable_config_is_an_error_in_the_newest_version(
    stdin: str, expected: tuple[str, int]
) -> None:
    assert respond(stdin, {"CNI_COMMAND": "ADD"}) == expected


@pytest.mark.parametrize(
    ("command", "version"),
    [("CHECK", "0.3.1"), ("STATUS", "1.0.0"), ("GC", "0.4.0"), ("CHECK", "0.1.0")],
)
def test_command_older_than_the_config_version_is_code_1(command: str, version: str) -> None:
    stdin = json.dumps({"cniVersion": version})
    assert respond(stdin, {"CNI_COMMAND": command}) == _error(
        version, 1, f"config version does not allow {command}"
    )


def test_unknown_command_is_code_4_in_the_config_version() -> None:
    assert respond('{"cniVersion": "0.4.0"}', {"CNI_COMMAND": "FROB"}) == _error(
        "0.4.0", 4, "unknown CNI_COMMAND: FROB"
    )


def test_config_without_version_is_0_1_0() -> None:
    assert respond("{}", {"CNI_COMMAND": "FROB"}) == _error("0.1.0", 4, "unknown CNI_COMMAND: FROB")


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("pod_fetch_attempts", 0, "a whole number >= 1, got 0"),
        ("pod_fetch_attempts", 2.5, "a whole number >= 1, got 2.5"),
        # As text a whole number has no fraction part (a JSON 2.0 is accepted, below).
        ("pod_fetch_attempts", "2.0", 'a whole number >= 1, got "2.0"'),
        ("pod_fetch_attempts", True, "a whole number >= 1, got true"),
        ("pod_fetch_attempts", None, "a whole number >= 1, got null"),
        ("pod_fetch_interval", -1, "a number of seconds >= 0, got -1"),
        ("pod_fetch_interval", "NaN", 'a number of seconds >= 0, got "NaN"'),
        ("pod_fetch_interval", "inf", 'a number of seconds >= 0, got "inf"'),
        ("pod_fetch_interval", [1], "a number of seconds >= 0, got [1]"),
    ],
)
def test_bad_netconf_number_is_code_7_naming_the_field(
    field: str, value: object, problem: str
) -> None:
    stdin = json.dumps({"cniVersion": "1.0.0", field: value})
    assert respond(stdin, {"CNI_COMMAND": "FROB"}) == _error(
        "1.0.0", 7, f"invalid network configuration: {field} must be {problem}"
    )


@pytest.mark.parametrize(
    "numbers",
    [
        {"pod_fetch_attempts": 1, "pod_fetch_interval": 0},
        {"pod_fetch_attempts": "3", "pod_fetch_interval": "0.5"},
        {"pod_fetch_attempts": 2.0, "pod_fetch_interval": 1e-3},
    ],
)
def test_good_netconf_numbers_reach_the_command(numbers: dict[str, object]) -> None:
    # FROB fails after the checks: the error says the numbers were accepted.
    stdin = json.dumps({"cniVersion": "1.0.0", **numbers})
    assert respond(stdin, {"CNI_COMMAND": "FROB"}) == _error(
        "1.0.0", 4, "unknown CNI_COMMAND: FROB"
    )


def test_call_defaults() -> None:
    call = Call("ADD", {"CNI_NETNS": "/var/run/netns/p"}, {})
    assert (call.version, call.netns, call.run_dir) == (
        "0.1.0",
        "/var/run/netns/p",
        "/var/run/meshnet-cni",
    )
    assert Call("ADD", {}, {"cni_agent_run_dir": "/run/x"}).run_dir == "/run/x"


def test_k8s_args_are_read_like_libcni() -> None:
    env = {"CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;X=y"}
    assert k8s_args(env) == {
        "IgnoreUnknown": "1",
        "K8S_POD_NAMESPACE": "default",
        "K8S_POD_NAME": "web-0",
        "X": "y",
    }
    assert k8s_args({}) == {}
    assert k8s_args({"CNI_ARGS": "K8S_POD_NAME=a=b;;"}) == {"K8S_POD_NAME": "a=b"}


@pytest.mark.parametrize(
    ("cni_args", "code", "message"),
    [
        ("K8S_POD_NAME", 4, "ARGS: invalid pair 'K8S_POD_NAME'"),
        ("K8S_POD_NAME=a;X=y;Z=", 4, "ARGS: unknown args ['X', 'Z']"),
        ("IgnoreUnknown=yes;X=y", 4, "ARGS: unknown args ['X']"),
    ],
)
def test_bad_k8s_args(cni_args: str, code: int, message: str) -> None:
    with pytest.raises(CniError) as caught:
        k8s_args({"CNI_ARGS": cni_args})
    assert (caught.value.code, str(caught.value)) == (code, message)


def test_require_env_names_every_missing_variable_in_order() -> None:
    call = Call("ADD", {"CNI_NETNS": "", "CNI_IFNAME": "eth0"}, {})
    require_env(call, "CNI_IFNAME")
    with pytest.raises(CniError) as caught:
        require_env(call, "CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS")
    assert (caught.value.code, str(caught.value)) == (
        4,
        "required env variables [CNI_CONTAINERID, CNI_NETNS] missing",
    )
