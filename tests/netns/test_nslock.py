"""The namespace lock (meshnet/nslock.py): one writer per network namespace, a bounded wait
that names the holder, nesting on one thread, and release when the holder is killed."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from meshnet import errors
from meshnet.host import netns, nslock
from tests.netns.harness import require_root_netns

pytestmark = pytest.mark.netns


@pytest.fixture
def ns() -> Iterator[str]:
    require_root_netns()
    name = f"mnl-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _try_lock(ns: str, timeout: float) -> BaseException | None:
    """Take `ns`'s lock on a fresh thread (as another CNI call of the agent would)."""
    failure: list[BaseException] = []

    def body() -> None:
        try:
            with netns.entered(ns), nslock.held(timeout):
                pass
        except BaseException as err:  # handed back to the test thread
            failure.append(err)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    return failure[0] if failure else None


def test_a_second_writer_times_out_with_the_holders_pid(ns: str) -> None:
    with netns.entered(ns), nslock.held():
        with nslock.held():  # the same thread nests
            pass
        err = _try_lock(ns, timeout=0.3)
    assert isinstance(err, errors.LockTimeout), err
    assert f"pid {os.getpid()} (" in str(err), err
    assert _try_lock(ns, timeout=0.3) is None  # released at the end of the block


def test_the_lock_is_per_namespace(ns: str) -> None:
    with netns.entered(ns), nslock.held():
        assert netns.run_isolated(lambda: _lock_here(0.3)) is None


def _lock_here(timeout: float) -> BaseException | None:
    try:
        with nslock.held(timeout):
            return None
    except errors.LockTimeout as err:
        return err


def test_held_from_outside_locks_the_target_not_the_callers_namespace(ns: str) -> None:
    with nslock.held_from_outside(ns):
        assert isinstance(_try_lock(ns, timeout=0.3), errors.LockTimeout)
        assert _lock_here(0.3) is None  # this thread's own namespace stays free
    assert _try_lock(ns, timeout=0.3) is None


def test_a_killed_holder_releases_the_lock(ns: str) -> None:
    code = (
        "import sys, time\n"
        "from meshnet.host import netns, nslock\n"
        "with netns.entered(sys.argv[1]), nslock.held():\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, ns], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        err = _try_lock(ns, timeout=0.3)
        assert isinstance(err, errors.LockTimeout) and f"pid {holder.pid} (" in str(err), err
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert _try_lock(ns, timeout=5) is None
