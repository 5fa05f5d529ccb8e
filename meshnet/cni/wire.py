"""The wire format between the plugin's forwarder (`cni-plugin/forwarder.c`) and the agent.

Every integer is a big-endian u32:
  request  "MCA1", field count N, then N fields (length, bytes): the command, one
           "NAME=value" per environment variable, and last the netconf from stdin.
  reply    one byte "A" once the request is read and taken (before it: the forwarder may run
           the standalone plugin instead), then exit code, stdout length, stdout bytes.
The forwarder sends its whole environment, as a runtime gives it to a plugin: DRY_RUN_FILE_PATH
and the env-only options come from there, as in Istio.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from meshnet.errors import AgentError

MAGIC = b"MCA1"
ACK = b"A"
MAX_FIELDS = 4096
MAX_REQUEST = 16 << 20  # bytes: a netconf with prevResult is a few KB


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


def reply_bytes(code: int, stdout: str) -> bytes:
    data = stdout.encode()
    return struct.pack(">II", code, len(data)) + data
