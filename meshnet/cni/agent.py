"""`meshnet cni agent`: the resident half of the CNI node side.

The plugin binary the runtime starts per pod (`cni-plugin/forwarder.c`) only moves bytes: it
connects to `<CNI_AGENT_RUN_DIR>/meshnet-cni.sock`, sends the call, and relays the reply. This
process runs the plugin logic (`plugin.respond`) for it, with warm imports, one TLS context and
kept-alive connections to the API server: a call costs the tool runs, not an interpreter start.

Wire format: `meshnet.cni.wire`. Worker pool: `meshnet.cni.pool`.

Concurrency: a thread per connection waits for its reply; a bounded pool of worker threads runs
the calls, pods in parallel, the calls of one container id one after another. Threads are safe
for the plugin logic: `setns(CLONE_NEWNET)` moves only the calling thread, and what a thread
starts (tool processes, netlink sockets) is created from that thread and so in its namespace;
each worker checks after every call that it is back in the agent's namespace, and retires if
not. A call that outlives its deadline gets a CNI error; its worker finishes it in the
background and the container's next call waits for that.

SIGTERM or SIGINT: the socket is unlinked first (new calls find no agent and the forwarder runs
the standalone plugin), connections already queued are still served, in-flight calls finish,
then the process exits 0.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from meshnet import logs
from meshnet.cni.pool import Hook, Job, Pool, error_reply, pod_of
from meshnet.cni.wire import ACK, Request, read_request, reply_bytes
from meshnet.errors import AgentError, MeshnetError, OptionError
from meshnet.host import netns

SOCKET_NAME = "meshnet-cni.sock"
READ_TIMEOUT = 10.0  # seconds for a forwarder to send its request (it sends it at once)
MAX_CONNECTIONS = 1024  # beyond this a caller is turned away and falls back
_SIGNALS = {signal.SIGTERM, signal.SIGINT}
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


DEFAULT_RUN_DIR = "/var/run/meshnet-cni"
DEFAULT_WORKERS = 16
DEFAULT_DEADLINE = 90.0


@dataclass(frozen=True, slots=True)
class Settings:
    run_dir: Path = Path(DEFAULT_RUN_DIR)
    workers: int = DEFAULT_WORKERS
    deadline: float = DEFAULT_DEADLINE
    log_level: str = "info"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        from meshnet.cni.install.settings import _Env

        env = _Env(environ)
        deadline_text = environ.get("MESHNET_CNI_AGENT_DEADLINE", "")
        try:
            deadline = float(deadline_text) if deadline_text else DEFAULT_DEADLINE
        except ValueError:
            deadline = -1
        if not 1 <= deadline <= 600:
            raise OptionError(
                f"MESHNET_CNI_AGENT_DEADLINE={deadline_text!r}: not a number of seconds "
                "from 1 to 600"
            )
        return cls(
            run_dir=Path(env.text("CNI_AGENT_RUN_DIR", DEFAULT_RUN_DIR)),
            workers=env.integer("MESHNET_CNI_AGENT_WORKERS", DEFAULT_WORKERS, 1, 256),
            deadline=deadline,
            log_level=env.text("MESHNET_LOG_LEVEL", "info"),
        )

    @property
    def socket_path(self) -> Path:
        return self.run_dir / SOCKET_NAME


# --------------------------------------------------------------------------- the server


class Agent:
    """The socket, the connection threads and the pool. `start()`, then `stop()`."""

    def __init__(self, settings: Settings, hooks: Sequence[Hook] = ()) -> None:
        self.settings = settings
        self._hooks = hooks
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._stopping = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._connections: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._pool: Pool | None = None
        self._acceptor: threading.Thread | None = None

    def start(self) -> None:
        _warm_imports()
        self._listener = _listen(self.settings)
        status = os.stat(self.settings.socket_path)
        self._inode = (status.st_dev, status.st_ino)
        self._pool = Pool(self.settings.workers, self._hooks, netns.current_inode())
        self._acceptor = threading.Thread(target=self._accept_loop, name="cni-accept")
        self._acceptor.start()
        logs.get().info(
            "serving",
            socket=str(self.settings.socket_path),
            workers=self.settings.workers,
            deadline=self.settings.deadline,
        )

    def stop(self) -> None:
        """Unlink the socket, serve what is queued on it, let in-flight calls finish."""
        self._stopping.set()
        if self._acceptor is not None:
            self._acceptor.join()
        self._remove_socket()
        listener = self._listener
        if listener is not None:
            listener.setblocking(False)
            while True:  # the path is gone: nothing new can queue, so this ends
                try:
                    conn, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                self._handle_async(conn)
            listener.close()
        with self._lock:
            pending = list(self._connections)
        for thread in pending:
            thread.join()
        if self._pool is not None:
            self._pool.stop()
        logs.get().info("stopped", socket=str(self.settings.socket_path))

    def _remove_socket(self) -> None:
        """Unlink the socket if it is still ours (a successor may have bound the path)."""
        try:
            status = os.stat(self.settings.socket_path)
            if (status.st_dev, status.st_ino) == self._inode:
                os.unlink(self.settings.socket_path)
        except FileNotFoundError:
            pass

    def _accept_loop(self) -> None:
        assert self._listener is not None
        self._listener.settimeout(0.2)  # wakes to see a stop request
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as err:
                logs.get().error("accept failed", error=str(err))
                time.sleep(0.05)
                continue
            self._handle_async(conn)

    def _handle_async(self, conn: socket.socket) -> None:
        if not self._slots.acquire(blocking=False):
            logs.get().warning("too many connections; the caller falls back")
            conn.close()
            return
        thread = threading.Thread(target=self._handle, args=(conn,), name="cni-conn", daemon=True)
        with self._lock:
            self._connections.add(thread)
        thread.start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.setblocking(True)
                self._serve(conn)
        except (OSError, AgentError) as err:
            logs.get().warning("connection dropped", error=str(err))
        finally:
            with self._lock:
                self._connections.discard(threading.current_thread())
            self._slots.release()

    def _serve(self, conn: socket.socket) -> None:
        pid, uid, _gid = _UCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
        if uid != 0:
            logs.get().warning("refused a caller that is not root", peer_pid=pid, peer_uid=uid)
            return
        conn.settimeout(READ_TIMEOUT)
        request = read_request(conn)
        conn.sendall(ACK)  # taken: from here on the forwarder relays what this agent answers
        job = Job(request)
        assert self._pool is not None
        self._pool.submit(job)
        if not job.done.wait(self.settings.deadline):
            job.abandoned = True
            output, code = _deadline_error(request, self.settings.deadline)
            logs.get().error(
                "cni request exceeded its deadline",
                command=request.command,
                pod=pod_of(request.env),
                container=job.container,
                deadline=self.settings.deadline,
            )
        else:
            output, code = job.output, job.code
        conn.settimeout(READ_TIMEOUT)
        conn.sendall(reply_bytes(code, output))


def _deadline_error(request: Request, deadline: float) -> tuple[str, int]:
    return error_reply(
        request, f"{request.command} did not finish within its deadline of {deadline:g} s"
    )


def _warm_imports() -> None:
    """Import what a call needs once, before the first call (it would otherwise pay them)."""
    import meshnet.apply.nft_engine
    import meshnet.apply.nft_tool
    import meshnet.cni.plugin.commands
    import meshnet.plan.nftables  # noqa: F401


def _listen(settings: Settings) -> socket.socket:
    """Bind the socket 0600 in a root-only (0700) run dir; refuse when an agent serves it."""
    run_dir, path = settings.run_dir, settings.socket_path
    if len(os.fsencode(path)) >= 108:
        raise AgentError(f"socket path {path} is too long for a Unix socket (108 bytes)")
    try:
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(run_dir, 0o700)
        if os.stat(run_dir).st_uid != os.geteuid():
            raise AgentError(f"{run_dir} is owned by uid {os.stat(run_dir).st_uid}, not by us")
    except OSError as err:
        raise AgentError(f"cannot prepare CNI_AGENT_RUN_DIR {run_dir}: {err.strerror}") from None
    _refuse_if_served(path)
    staging = run_dir / f".{SOCKET_NAME}.{os.getpid()}"
    staging.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(str(staging))
        os.chmod(staging, 0o600)
        listener.listen(512)
        os.replace(staging, path)  # appears at its path already listening and 0600
    except OSError as err:
        listener.close()
        staging.unlink(missing_ok=True)
        raise AgentError(f"cannot listen on {path}: {err.strerror}") from None
    return listener


def _refuse_if_served(path: Path) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise AgentError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return  # a stale socket left by an agent that died: replaced
    raise AgentError(f"another agent already serves {path}")


# --------------------------------------------------------------------------- the process


def run(settings: Settings, hooks: Sequence[Hook] = ()) -> int:
    """Serve until SIGTERM/SIGINT (taken synchronously, as the installer does), then stop."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)  # before any thread starts
    agent = Agent(settings, hooks)
    agent.start()
    try:
        signo = 0
        while signo not in _SIGNALS:
            # None on timeout; under load this CPython has also returned si_signo 0 here
            received = signal.sigtimedwait(_SIGNALS, 1.0)
            signo = received.si_signo if received is not None else 0
        logs.get().info("signal received; stopping", signal=signal.Signals(signo).name)
    finally:
        agent.stop()
    return 0


def main(environ: Mapping[str, str] | None = None, hooks: Sequence[Hook] = ()) -> int:
    env = os.environ if environ is None else environ
    logs.configure("json", f"default:{env.get('MESHNET_LOG_LEVEL') or 'info'}")
    try:
        return run(Settings.from_env(env), hooks)
    except MeshnetError as err:
        logs.get().error(str(err))
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
