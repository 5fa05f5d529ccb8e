"""`meshnet cni agent`: the resident half of the CNI node side.

The plugin binary the runtime starts per pod (`cni-plugin/forwarder.c`) only moves bytes: it
connects to `<CNI_AGENT_RUN_DIR>/meshnet-cni.sock`, sends the call, and relays the reply. This
process runs the plugin logic (`plugin.respond`) for it, with warm imports, one TLS context and
kept-alive connections to the API server: a call costs the tool runs, not an interpreter start.

Wire format (every integer a big-endian u32):
  request  "MCA1", field count N, then N fields (length, bytes): the command, one
           "NAME=value" per environment variable, and last the netconf from stdin.
  reply    one byte "A" once the request is read and taken (before it: the forwarder may run
           the standalone plugin instead), then exit code, stdout length, stdout bytes.
The forwarder sends its whole environment, as a runtime gives it to a plugin: DRY_RUN_FILE_PATH
and the env-only options come from there, as in Istio.

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

import collections
import json
import os
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from meshnet import logs, netns
from meshnet.cni import plugin
from meshnet.errors import MeshnetError, OptionError

SOCKET_NAME = "meshnet-cni.sock"
MAGIC = b"MCA1"
ACK = b"A"
MAX_FIELDS = 4096
MAX_REQUEST = 16 << 20  # bytes: a netconf with prevResult is a few KB
READ_TIMEOUT = 10.0  # seconds for a forwarder to send its request (it sends it at once)
MAX_CONNECTIONS = 1024  # beyond this a caller is turned away and falls back
_SIGNALS = {signal.SIGTERM, signal.SIGINT}
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class AgentError(MeshnetError):
    """The agent cannot serve (socket directory, socket, another agent)."""


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


@dataclass(frozen=True, slots=True)
class Finished:
    """One served call, for hooks (metrics): what, how it ended, how long, what was waiting."""

    command: str
    pod: str  # namespace/name from CNI_ARGS, "" when not a Kubernetes pod
    container: str
    exit_code: int
    seconds: float  # from taken off the socket to done, queueing included
    queue_depth: int  # calls taken but not yet started when this one finished
    timed_out: bool


Hook = Callable[[Finished], None]


# --------------------------------------------------------------------------- wire format


def encode_request(command: str, environ: Mapping[str, str], stdin: bytes) -> bytes:
    """The forwarder's request (used by tests and the benchmark; forwarder.c writes the same)."""
    fields = [command.encode(), *(f"{k}={v}".encode() for k, v in environ.items()), stdin]
    parts = [MAGIC, struct.pack(">I", len(fields))]
    for item in fields:
        parts += [struct.pack(">I", len(item)), item]
    return b"".join(parts)


def decode_reply(data: bytes) -> tuple[int, bytes]:
    """(exit code, stdout) from a reply after its ACK byte."""
    code, length = struct.unpack(">II", data[:8])
    return code, data[8 : 8 + length]


@dataclass(frozen=True, slots=True)
class Request:
    command: str
    env: dict[str, str]
    stdin: str


def read_request(conn: socket.socket) -> Request:
    reader = _Reader(conn)
    if reader.exactly(4) != MAGIC:
        raise AgentError("not a meshnet-cni request (bad magic)")
    count = reader.u32()
    if not 2 <= count <= MAX_FIELDS:
        raise AgentError(f"bad field count {count}")
    fields = [reader.exactly(reader.u32()) for _ in range(count)]
    env = {}
    for item in fields[1:-1]:
        name, sep, value = item.decode(errors="surrogateescape").partition("=")
        if sep:
            env[name] = value
    return Request(fields[0].decode(errors="replace"), env, fields[-1].decode(errors="replace"))


class _Reader:
    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn
        self._total = 0

    def u32(self) -> int:
        value: int = struct.unpack(">I", self.exactly(4))[0]
        return value

    def exactly(self, size: int) -> bytes:
        self._total += size
        if self._total > MAX_REQUEST:
            raise AgentError(f"request larger than {MAX_REQUEST} bytes")
        chunks, left = [], size
        while left:
            chunk = self._conn.recv(min(left, 1 << 16))
            if not chunk:
                raise AgentError("connection closed mid-request")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)


def _reply_bytes(code: int, stdout: str) -> bytes:
    data = stdout.encode()
    return struct.pack(">II", code, len(data)) + data


# --------------------------------------------------------------------------- the worker pool


@dataclass(eq=False)
class Job:
    request: Request
    taken: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    output: str = ""
    code: int = 0
    abandoned: bool = False  # its deadline passed: the caller got an error already

    @property
    def container(self) -> str:
        return self.request.env.get("CNI_CONTAINERID", "")

    @property
    def key(self) -> str:
        """Calls with the same key run one after another; no container id: no ordering."""
        return self.container or f"#{id(self)}"


class Pool:
    """Worker threads; a container id's calls are serialized, in the order they came."""

    def __init__(self, workers: int, hooks: Sequence[Hook], home: int) -> None:
        self._ready: collections.deque[Job | None] = collections.deque()
        self._behind: dict[str, collections.deque[Job]] = {}  # key -> calls after the running one
        self._cond = threading.Condition()
        self._hooks = tuple(hooks)
        self._home = home  # the agent's network namespace (inode)
        self._threads: list[threading.Thread] = []
        self._waiting = 0  # taken, not yet started
        for _ in range(workers):
            self._spawn()

    def submit(self, job: Job) -> None:
        with self._cond:
            self._waiting += 1
            behind = self._behind.get(job.key)
            if behind is not None:  # this container has a call queued or running
                behind.append(job)
                return
            self._behind[job.key] = collections.deque()
            self._ready.append(job)
            self._cond.notify()

    def stop(self) -> None:
        """Let the workers finish every taken call, then end them."""
        with self._cond:
            while self._behind:  # a call past its deadline may still be running or queued
                self._cond.wait()
            self._ready.extend([None] * len(self._threads))
            self._cond.notify_all()
        for thread in list(self._threads):
            thread.join()

    def _spawn(self) -> None:
        thread = threading.Thread(target=self._work, name="cni-worker", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _next(self) -> Job | None:
        with self._cond:
            while not self._ready:
                self._cond.wait()
            job = self._ready.popleft()
            if job is not None:
                self._waiting -= 1
            return job

    def _work(self) -> None:
        while (job := self._next()) is not None:
            try:
                job.output, job.code = plugin.respond(job.request.stdin, job.request.env)
            except BaseException as err:  # respond() catches Exception; keep the worker anyway
                job.output, job.code = _error(job.request, f"agent worker failed: {err!r}")
            seconds = time.monotonic() - job.taken
            job.done.set()
            depth = self._finish(job)
            _log_done(job, seconds, depth)
            self._run_hooks(
                Finished(
                    job.request.command,
                    _pod_of(job.request.env),
                    job.container,
                    job.code,
                    seconds,
                    depth,
                    job.abandoned,
                )
            )
            if netns.current_inode() != self._home:  # never serve a call from a pod's namespace
                logs.get().error("worker left in another network namespace; replacing it")
                with self._cond:
                    self._threads.remove(threading.current_thread())
                    self._spawn()
                return

    def _finish(self, job: Job) -> int:
        with self._cond:
            behind = self._behind[job.key]
            if behind:
                self._ready.append(behind.popleft())
                self._cond.notify()
            else:
                del self._behind[job.key]
                self._cond.notify_all()  # stop() waits for the last one
            return self._waiting

    def _run_hooks(self, finished: Finished) -> None:
        for hook in self._hooks:
            try:
                hook(finished)
            except Exception as err:  # a metrics hook must never break serving
                logs.get().error("request hook failed", hook=repr(hook), error=repr(err))


def _pod_of(env: Mapping[str, str]) -> str:
    pairs = dict(item.partition("=")[::2] for item in env.get("CNI_ARGS", "").split(";") if item)
    namespace, name = pairs.get("K8S_POD_NAMESPACE", ""), pairs.get("K8S_POD_NAME", "")
    return f"{namespace}/{name}" if name else ""


def _log_done(job: Job, seconds: float, depth: int) -> None:
    logs.get().info(
        "cni request done",
        command=job.request.command,
        pod=_pod_of(job.request.env),
        container=job.container,
        exit_code=job.code,
        seconds=round(seconds, 4),
        queue_depth=depth,
        **({"after_deadline": True} if job.abandoned else {}),
    )


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
                pod=_pod_of(request.env),
                container=job.container,
                deadline=self.settings.deadline,
            )
        else:
            output, code = job.output, job.code
        conn.settimeout(READ_TIMEOUT)
        conn.sendall(_reply_bytes(code, output))


def _deadline_error(request: Request, deadline: float) -> tuple[str, int]:
    return _error(
        request, f"{request.command} did not finish within its deadline of {deadline:g} s"
    )


def _error(request: Request, what: str) -> tuple[str, int]:
    """A CNI error document in the call's config version, as the plugin prints one."""
    try:
        version = str(json.loads(request.stdin).get("cniVersion", "1.1.0"))
    except (ValueError, AttributeError):
        version = "1.1.0"
    message = f"{plugin.PLUGIN_TYPE} agent: {what}"
    document = {"cniVersion": version, "code": plugin.ERR_INTERNAL, "msg": message}
    return json.dumps(document, indent=4) + "\n", 1


def _warm_imports() -> None:
    """Import what a call needs once, before the first call (it would otherwise pay them)."""
    import meshnet.backends.nftables
    import meshnet.cni.commands
    import meshnet.nftengine
    import meshnet.nftplan  # noqa: F401


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
