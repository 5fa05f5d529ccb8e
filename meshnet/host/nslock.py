"""One writer per network namespace: an exclusive lock held from the state check to the read-back.

The lock is an abstract unix socket, `@meshnet-netns-lock`, bound in the target namespace.
Abstract socket names belong to the network namespace the socket was created in, so the lock is
scoped per namespace by construction; it needs no writable filesystem, and the kernel releases
it when the holder exits or is killed. The holder listens, so a waiter can connect and learn
the holder's pid with SO_PEERCRED for its error message.

A thread that already holds the lock of its current namespace may take it again (nesting: the
CNI commands hold it around the engine, which takes it too). Another thread of the same
process — the CNI agent runs calls on threads — waits like another process would, because its
bind fails the same way.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from meshnet.errors import LockTimeout, MeshnetError
from meshnet.host import netns

__all__ = ["LOCK_NAME", "TIMEOUT", "LockTimeout", "held", "held_from_outside", "holder"]

LOCK_NAME = b"\0meshnet-netns-lock"
TIMEOUT = 60.0
"""Seconds to wait for another writer; longer than any apply (a kubelet CNI call times out
long before)."""

_RETRY = 0.01
_held = threading.local()  # per thread: netns inode -> nesting depth


@contextmanager
def held(timeout: float = TIMEOUT) -> Iterator[None]:
    """Hold the current thread's network namespace's lock for the block (waits up to `timeout`)."""
    inode = netns.current_inode()
    depths: dict[int, int] = _held.__dict__.setdefault("depths", {})
    if depths.get(inode):
        depths[inode] += 1
        try:
            yield
        finally:
            depths[inode] -= 1
        return
    sock = _acquire(inode, timeout)
    depths[inode] = 1
    try:
        yield
    finally:
        del depths[inode]
        sock.close()


@contextmanager
def held_from_outside(ns: str, timeout: float = TIMEOUT) -> Iterator[None]:
    """Hold namespace `ns`'s lock while the thread stays in its own namespace: a CNI ADD talks
    to the API server from the node's namespace, and a DEL of the same pod must wait for it."""
    with ExitStack() as stack:
        with netns.entered(ns):
            stack.enter_context(held(timeout))
        yield


def _acquire(inode: int, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        # Created here, so in this thread's current namespace: that is where the name lives.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(LOCK_NAME)
            sock.listen(64)
            return sock
        except OSError as err:
            sock.close()
            if err.errno != errno.EADDRINUSE:
                raise MeshnetError(
                    f"cannot take the network namespace lock: {err.strerror}"
                ) from None
        if time.monotonic() >= deadline:
            who = holder()
            by = f"pid {who} ({_command(who)})" if who else "another process"
            raise LockTimeout(
                f"network namespace (inode {inode}) is locked by {by}: another meshnet run "
                f"kept it for {timeout:g}s; retry when it has finished"
            )
        time.sleep(_RETRY)


def holder() -> int | None:
    """The pid holding the current namespace's lock (None: free, or it cannot be learnt)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(1.0)
        sock.connect(LOCK_NAME)
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    finally:
        sock.close()
    pid = struct.unpack("3i", creds)[0]
    return pid or None


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            words = handle.read().split(b"\0")
    except OSError:
        return "unknown command"
    return " ".join(os.fsdecode(w) for w in words if w)[:120] or "unknown command"
