"""A TCP proxy in front of a real MongoDB that cuts the connection of chosen commands: a deterministic MongoDB
failure in the middle of a write (the delete of one collection fails, the ones before it went through).

It reads the MongoDB wire protocol's messages (``OP_MSG``) from the client, looks at the command's name and
collection (the first field of its body) and, for a command it was told to cut, closes both sockets before
the server sees it: the driver gets a connection error (``AutoReconnect``), as when MongoDB goes away.
Everything else is forwarded byte for byte, both ways.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator

import bson

OP_MSG = 2013
HEADER = struct.Struct("<iiii")  # messageLength, requestID, responseTo, opCode


class WireCut:
    """Listen on a free port of 127.0.0.1 and forward to ``upstream_port``; ``cut`` holds the
    ``(command, collection)`` pairs whose messages are cut (``("delete", "conversation_memory")``)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.cut: set[tuple[str, str]] = set()
        self.cuts = 0  # how many messages were cut
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._to_server, args=(client, upstream), daemon=True).start()
            threading.Thread(target=_copy, args=(upstream, client), daemon=True).start()

    def _to_server(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            for message in _messages(client):
                if command_of(message) in self.cut:
                    self.cuts += 1
                    break
                upstream.sendall(message)
        except OSError:
            pass
        finally:
            _close(client, upstream)


def command_of(message: bytes) -> tuple[str, str] | None:
    """``(command name, collection)`` of an ``OP_MSG`` command (its body's first field), else ``None``."""
    _, _, _, op_code = HEADER.unpack_from(message)
    offset = HEADER.size + 4  # flagBits
    if op_code != OP_MSG:
        return None
    while offset < len(message):
        kind = message[offset]
        offset += 1
        (size,) = struct.unpack_from("<i", message, offset)
        if kind == 0:
            body = bson.decode(message[offset : offset + size])
            name, value = next(iter(body.items()))
            return name, value if isinstance(value, str) else ""
        offset += size
    return None


def _messages(sock: socket.socket) -> Iterator[bytes]:
    while True:
        header = _read(sock, HEADER.size)
        if header is None:
            return
        (length,) = struct.unpack_from("<i", header)
        rest = _read(sock, length - HEADER.size)
        if rest is None:
            return
        yield header + rest


def _read(sock: socket.socket, count: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < count:
        chunk = sock.recv(count - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def _copy(source: socket.socket, target: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            target.sendall(chunk)
    except OSError:
        pass
    finally:
        _close(source, target)


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()
