"""The agent's worker pool: the threads that run `main.respond` for each call taken off the
socket, a container id's calls one after another, and the hooks told of each finished call."""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from meshnet import logs
from meshnet.cni.plugin import main
from meshnet.cni.wire import Request
from meshnet.host import netns


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
                job.output, job.code = main.respond(job.request.stdin, job.request.env)
            except BaseException as err:  # respond() catches Exception; keep the worker anyway
                job.output, job.code = error_reply(job.request, f"agent worker failed: {err!r}")
            seconds = time.monotonic() - job.taken
            job.done.set()
            depth = self._finish(job)
            _log_done(job, seconds, depth)
            self._run_hooks(
                Finished(
                    job.request.command,
                    pod_of(job.request.env),
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


def pod_of(env: Mapping[str, str]) -> str:
    pairs = dict(item.partition("=")[::2] for item in env.get("CNI_ARGS", "").split(";") if item)
    namespace, name = pairs.get("K8S_POD_NAMESPACE", ""), pairs.get("K8S_POD_NAME", "")
    return f"{namespace}/{name}" if name else ""


def _log_done(job: Job, seconds: float, depth: int) -> None:
    logs.get().info(
        "cni request done",
        command=job.request.command,
        pod=pod_of(job.request.env),
        container=job.container,
        exit_code=job.code,
        seconds=round(seconds, 4),
        queue_depth=depth,
        **({"after_deadline": True} if job.abandoned else {}),
    )


def error_reply(request: Request, what: str) -> tuple[str, int]:
    """A CNI error document in the call's config version, as the plugin prints one."""
    try:
        version = str(json.loads(request.stdin).get("cniVersion", "1.1.0"))
    except (ValueError, AttributeError):
        version = "1.1.0"
    message = f"{main.PLUGIN_TYPE} agent: {what}"
    document = {"cniVersion": version, "code": main.ERR_INTERNAL, "msg": message}
    return json.dumps(document, indent=4) + "\n", 1
