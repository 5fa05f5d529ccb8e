"""Run one external tool: argument list, explicit timeout, text on stdin, output captured.

Every subprocess meshnet starts goes through `run`, so its rules (no shell, a timeout, stderr
kept for the error message) live in one place. A child inherits the network namespace of the
calling thread, which is how `netns.entered` reaches the tools.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence

from meshnet.errors import BackendError


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    stdin: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `argv` to completion and return its result; a non-zero exit is not an error here.

    Raises BackendError only when the tool cannot be started or does not finish in time.
    `env` entries are added to (not substituted for) this process's environment.
    """
    command = list(argv)
    full_env = {**os.environ, **env} if env else None
    try:
        return subprocess.run(  # a fixed argument list, never a shell
            command,
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            check=False,
        )
    except FileNotFoundError:
        raise BackendError(f"{command[0]} not found in PATH") from None
    except subprocess.TimeoutExpired:
        raise BackendError(
            f"`{format_command(command)}` did not finish within {timeout:g} s"
        ) from None
    except OSError as err:
        raise BackendError(f"cannot execute {command[0]}: {err.strerror}") from None


def which(name: str) -> str | None:
    """The path `run([name])` would execute, or None: shutil.which's answer for a tool name,
    without importing shutil (its archive modules cost an init container more than this)."""
    if os.sep in name:
        return name if _executable(name) else None
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(directory or os.curdir, name)
        if _executable(path):
            return path
    return None


def _executable(path: str) -> bool:
    return os.access(path, os.X_OK) and not os.path.isdir(path)


def format_command(argv: Sequence[str]) -> str:
    """The command as a user would type it (for messages only, never executed)."""
    return " ".join(argv)


def stderr_summary(result: subprocess.CompletedProcess[str]) -> str:
    """The tool's stderr (or stdout when stderr is empty) folded onto one line."""
    text = result.stderr.strip() or result.stdout.strip()
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())
