"""Minimal keep-alive HTTP/1.1 clients for the ranking service (the venv has no httpx/aiohttp): one for threads
(:class:`Client`) and one for asyncio (:class:`AsyncClient`), used by the tests, ``bench serve`` and the
simulated audience.

Each request is written with ONE ``sendall`` (head and body together) on a TCP_NODELAY socket: a head and a
body in two writes meet Nagle's algorithm and the peer's delayed ACK, which adds ~40 ms to every request
(``http.client`` does exactly that). Responses must carry ``Content-Length`` (uvicorn's do).
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any


def _request_bytes(method: str, path: str, host: str, body: bytes | None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + (body or b"")


def _parse_head(head: bytes) -> tuple[int, int, bool]:
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    return status, length, close


def _body(data: Any) -> bytes | None:
    if data is None or isinstance(data, bytes):
        return data
    return json.dumps(data).encode()


class Client:
    """A blocking client on one keep-alive connection (reconnects when the server closed it)."""

    def __init__(self, host: str, port: int, timeout: float = 30.0):
        self.host, self.port, self.timeout = host, port, timeout
        self.sock: socket.socket | None = None
        self.buf = b""

    def _connect(self) -> None:
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _read_until(self, n: int | None = None, sep: bytes | None = None) -> bytes:
        while True:
            if sep is not None and sep in self.buf:
                out, _, self.buf = self.buf.partition(sep)
                return out
            if n is not None and len(self.buf) >= n:
                out, self.buf = self.buf[:n], self.buf[n:]
                return out
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self.buf += chunk

    def request(self, method: str, path: str, data: Any = None) -> tuple[int, bytes]:
        """(status, body bytes). ``data``: bytes sent as they are, or an object sent as JSON."""
        raw = _request_bytes(method, path, self.host, _body(data))
        for attempt in (0, 1):
            if self.sock is None:
                self._connect()
            try:
                self.sock.sendall(raw)
                status, length, close = _parse_head(self._read_until(sep=b"\r\n\r\n"))
                body = self._read_until(n=length)
                if close:
                    self.close()
                return status, body
            except (ConnectionError, BrokenPipeError) as e:
                self.close()
                if attempt:
                    raise ConnectionError(f"{method} {path}: {e}") from None
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, data: Any = None) -> tuple[int, Any]:
        status, body = self.request(method, path, data)
        return status, json.loads(body) if body else None

    def rank(self, req: dict) -> tuple[int, Any]:
        return self.json("POST", "/rank", req)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """An asyncio client on one keep-alive connection."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def request(self, method: str, path: str, data: Any = None) -> tuple[int, bytes]:
        if self.writer is None:
            await self._connect()
        self.writer.write(_request_bytes(method, path, self.host, _body(data)))
        head = await self.reader.readuntil(b"\r\n\r\n")
        status, length, close = _parse_head(head[:-4])
        body = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (ConnectionError, OSError):
                pass
            self.writer = self.reader = None
