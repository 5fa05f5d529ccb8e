"""Enter an existing network namespace for a block of code, or work in a throw-away one.

`setns(2)` moves only the calling *thread*. Use `entered` from the main thread (meshnet is
single-threaded on this path): everything the block does in that thread — subprocesses it
starts, netlink sockets it opens — happens inside the namespace, and the original namespace is
restored on exit. A thread started inside the block does NOT inherit the namespace.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from meshnet.errors import NamespaceError

__all__ = ["NETNS_RUN_DIR", "current_inode", "entered", "resolve", "run_isolated"]

NETNS_RUN_DIR = "/var/run/netns"
"""Where `ip netns add NAME` bind-mounts named namespaces."""

_CLONE_NEWNET = 0x40000000
_SELF = "/proc/thread-self/ns/net"  # the calling thread's namespace, not the main thread's

T = TypeVar("T")


def resolve(ns: str) -> str:
    """The namespace file for `ns`: a path is kept, a bare name is looked up in /var/run/netns."""
    if not ns:
        raise NamespaceError("network namespace name is empty")
    if "/" in ns:
        return ns
    if ns in (".", ".."):
        raise NamespaceError(f'network namespace name "{ns}" is not valid')
    return os.path.join(NETNS_RUN_DIR, ns)


@contextmanager
def entered(ns: str) -> Iterator[None]:
    """Run the block inside the existing network namespace `ns` (path or name); never create it."""
    path = resolve(ns)
    target = _open_namespace(ns, path)
    try:
        original = os.open(_SELF, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target, f'network namespace "{ns}" ({path})')
            try:
                yield
            finally:
                _setns(original, "the original network namespace")
        finally:
            os.close(original)
    finally:
        os.close(target)


def current_inode() -> int:
    """Inode number of the calling thread's network namespace (identifies it)."""
    return os.stat(_SELF).st_ino


def run_isolated(fn: Callable[[], T]) -> T:
    """Run `fn` on a fresh thread inside a new, empty network namespace; return its result.

    The namespace has no name and no other member, so the kernel frees it when the thread
    ends: nothing can leak, even on a crash. Used to canonicalize rules with the real tools.
    """
    outcome: list[T] = []
    failure: list[BaseException] = []

    def worker() -> None:
        try:
            _unshare_network()
            outcome.append(fn())
        except BaseException as err:  # handed to the caller's thread below
            failure.append(err)

    thread = threading.Thread(target=worker, name="meshnet-isolated-netns")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def _open_namespace(ns: str, path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceError(
            f'network namespace "{ns}" not found: {path} does not exist '
            "(create it first, e.g. `ip netns add NAME`; meshnet never creates one)"
        ) from None
    except OSError as err:
        raise NamespaceError(
            f'cannot open network namespace "{ns}" ({path}): {err.strerror}'
        ) from None


def _libc_call(function: str, *args: int) -> int:
    """Call libc's `function`: 0, or the errno it failed with. ctypes is imported here, not
    at the top: an init container that stays in its own namespace never pays for it."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return 0 if getattr(libc, function)(*args) == 0 else ctypes.get_errno()


def _setns(fd: int, what: str) -> None:
    code = _libc_call("setns", fd, _CLONE_NEWNET)
    if code == 0:
        return
    if code == errno.EINVAL:
        raise NamespaceError(f"cannot enter {what}: it is not a network namespace")
    if code == errno.EPERM:
        raise NamespaceError(
            f"cannot enter {what}: permission denied (needs root or CAP_SYS_ADMIN)"
        )
    raise NamespaceError(f"cannot enter {what}: {os.strerror(code)}")


def _unshare_network() -> None:
    code = _libc_call("unshare", _CLONE_NEWNET)
    if code != 0:
        raise NamespaceError(f"cannot create a private network namespace: {os.strerror(code)}")
