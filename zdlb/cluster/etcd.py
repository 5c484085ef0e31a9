"""A small etcd v3 client over etcd's JSON gateway (HTTP/1.1 + JSON on the client port).

Why the gateway and not a gRPC client: ``aetcd`` 1.0.0 pulls grpcio and protobuf (48 MB
installed) and ``import aetcd`` takes 75-116 ms here (``python -X importtime``), while the
gateway is served by every etcd >= 3.3 on its client port and needs nothing beyond asyncio
streams; zdlb uses nine calls of it (range, txn, lease grant/keepalive/revoke, watch,
authenticate). The wire format: POST ``/v3/...`` with a JSON body, keys and values base64,
64-bit integers as strings, fields at their zero value left out (proto3 JSON).

Rules:
1. Every request runs under ``timeout_s``; any failure (refused, reset, timeout, an HTTP error,
   an unreadable answer) raises ``ClusterUnavailable`` naming the endpoint. A caller never sees
   a raw ``OSError``.
2. Endpoints are tried in order, starting with the last one that answered.
3. One idle keep-alive connection per endpoint is kept for the next request; a watch has its
   own connection, a chunked response of newline-separated JSON messages.
4. With ``[cluster.auth]`` the client authenticates once and again when etcd says the token
   expired (simple tokens last 5 minutes by default).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from zdlb.errors import ClusterUnavailable

log = logging.getLogger(__name__)

# An answer of ours is a few KiB (a fleet's server keys); a head or message larger than this
# is not etcd's gateway talking.
MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
# gRPC's UNAUTHENTICATED: the token expired or was revoked.
_UNAUTHENTICATED = 16


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A put (``value`` set) or a delete (``value`` None) at ``kv.mod_revision``."""

    kv: KeyValue
    is_delete: bool


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    # On failure: the keys the transaction compared, as they are now (its "else" ranges).
    current: tuple[KeyValue, ...] = ()


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def prefix_end(prefix: str) -> str:
    """The range end covering every key starting with ``prefix`` (etcd's convention)."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1  # prefixes here are ASCII paths: the last byte is never 0xff
    return b64(bytes(raw))


class EtcdClient:
    """etcd v3 through the JSON gateway. ``ssl_context``: for https endpoints."""

    def __init__(
        self,
        endpoints: Sequence[str],
        timeout_s: float,
        ssl_context: ssl.SSLContext | None = None,
        auth: tuple[str, str] | None = None,
    ) -> None:
        self._endpoints = list(endpoints)
        self._timeout_s = timeout_s
        self._ssl = ssl_context
        self._auth = auth
        self._token: str | None = None
        self._current = 0  # index of the endpoint that answered last
        self._idle: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}

    def __repr__(self) -> str:
        return f"<EtcdClient {self.endpoint} idle={len(self._idle)}>"

    @property
    def endpoint(self) -> str:
        return self._endpoints[self._current]

    async def close(self) -> None:
        idle, self._idle = self._idle, {}
        for _, writer in idle.values():
            writer.close()

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``/v3/PATH`` on the first endpoint that answers; its JSON answer.

        Raises ClusterUnavailable when none does (rule 1).
        """
        errors = []
        count = len(self._endpoints)
        for offset in range(count):
            index = (self._current + offset) % count
            endpoint = self._endpoints[index]
            try:
                async with asyncio.timeout(self._timeout_s):
                    answer = await self._call_authenticated(endpoint, path, body)
            except (OSError, TimeoutError, ValueError, EOFError, ClusterUnavailable) as exc:
                self._drop(endpoint)
                errors.append(f"{endpoint}: {_reason(exc)}")
                continue
            self._current = index
            return answer
        raise ClusterUnavailable("etcd unreachable (" + "; ".join(errors) + ")")

    async def _call_authenticated(
        self, endpoint: str, path: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        if self._auth is not None and self._token is None:
            user, password = self._auth
            answer = await self._post(
                endpoint, "auth/authenticate", {"name": user, "password": password}
            )
            self._token = str(answer.get("token", ""))
        try:
            return await self._post(endpoint, path, body)
        except _Unauthenticated:
            if self._auth is None:
                raise ClusterUnavailable(
                    "etcd requires authentication: set [cluster.auth]"
                ) from None
            self._token = None  # expired: once more with a fresh token
            return await self._call_authenticated(endpoint, path, body)

    async def _post(self, endpoint: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        reader, writer = await self._connection(endpoint)
        writer.write(self._request(endpoint, path, body))
        await writer.drain()
        status, headers = await _read_head(reader)
        payload = await _read_body(reader, headers)
        if headers.get("connection", "").lower() == "close" or endpoint in self._idle:
            writer.close()
        else:
            self._idle[endpoint] = (reader, writer)
        answer = json.loads(payload) if payload else {}
        if not isinstance(answer, dict):
            raise ValueError("the answer is not a JSON object")
        if status != 200:
            if answer.get("code") == _UNAUTHENTICATED:
                raise _Unauthenticated(str(answer.get("message", "")))
            message = answer.get("message") or answer.get("error") or f"HTTP {status}"
            raise ClusterUnavailable(f"etcd answered {status}: {message}")
        return answer

    def _request(self, endpoint: str, path: str, body: dict[str, Any]) -> bytes:
        data = json.dumps(body).encode()
        host = urlsplit(endpoint).netloc
        token = f"Authorization: {self._token}\r\n" if self._token else ""
        head = (
            f"POST /v3/{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n{token}\r\n"
        )
        return head.encode() + data

    async def _connection(self, endpoint: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        idle = self._idle.pop(endpoint, None)
        if idle is not None and not idle[1].is_closing() and not idle[0].at_eof():
            return idle
        if idle is not None:
            idle[1].close()
        url = urlsplit(endpoint)
        is_tls = url.scheme == "https"
        context = (self._ssl or ssl.create_default_context()) if is_tls else None
        return await asyncio.open_connection(
            url.hostname, url.port, ssl=context, limit=MAX_HEAD_BYTES
        )

    def _drop(self, endpoint: str) -> None:
        idle = self._idle.pop(endpoint, None)
        if idle is not None:
            idle[1].close()

    # -- the calls zdlb makes -------------------------------------------------------------

    async def range_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """(revision, every key under ``prefix``)."""
        return await self.range_keys(prefix, prefix_end(prefix))

    async def range_keys(self, key: str, range_end_b64: str) -> tuple[int, list[KeyValue]]:
        """(revision, every key from ``key`` up to the base64 ``range_end_b64``)."""
        answer = await self.call("kv/range", {"key": b64(key), "range_end": range_end_b64})
        return _revision(answer), [_kv(item) for item in answer.get("kvs", [])]

    async def txn(
        self,
        compares: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure_keys: Sequence[str] = (),
    ) -> TxnResult:
        """A transaction; on failure it reads ``failure_keys`` (to tell who won)."""
        failure = [{"request_range": {"key": b64(key)}} for key in failure_keys]
        body = {"compare": compares, "success": success, "failure": failure}
        answer = await self.call("kv/txn", body)
        if answer.get("succeeded", False):
            return TxnResult(True, _revision(answer))
        current = [
            _kv(item)
            for response in answer.get("responses", [])
            for item in response.get("response_range", {}).get("kvs", [])
        ]
        return TxnResult(False, _revision(answer), tuple(current))

    async def grant(self, ttl_s: int) -> int:
        answer = await self.call("lease/grant", {"TTL": str(ttl_s)})
        return int(answer["ID"])

    async def keepalive(self, lease: int) -> int:
        """Renew ``lease``; its TTL now (0: it had expired, and is gone)."""
        answer = await self.call("lease/keepalive", {"ID": str(lease)})
        return int(answer.get("result", {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        await self.call("lease/revoke", {"ID": str(lease)})

    async def watch(
        self, prefix: str, start_revision: int, range_end_b64: str | None = None
    ) -> AsyncIterator[list[WatchEvent]]:
        """Every change under ``prefix`` (or up to ``range_end_b64``) from ``start_revision``
        on, a batch (one revision or more) at a time, until the connection ends
        (ClusterUnavailable).

        Raises ``Compacted`` when etcd no longer has ``start_revision``: the caller reads the
        whole prefix again instead.
        """
        if self._auth is not None:
            await self.call("kv/range", {"key": b64(prefix), "limit": "1"})  # a fresh token
        endpoint = self.endpoint
        body = {
            "create_request": {
                "key": b64(prefix),
                "range_end": range_end_b64 or prefix_end(prefix),
                "start_revision": str(start_revision),
            }
        }
        try:
            async with asyncio.timeout(self._timeout_s):
                reader, writer = await self._connection(endpoint)
                writer.write(self._request(endpoint, "watch", body))
                await writer.drain()
                status, headers = await _read_head(reader)
        except (OSError, TimeoutError, ValueError, EOFError) as exc:
            raise ClusterUnavailable(f"etcd watch failed ({endpoint}: {_reason(exc)})") from None
        try:
            if status != 200:
                raise ClusterUnavailable(f"etcd watch answered {status} ({endpoint})")
            async for message in _messages(reader, headers):
                result = message.get("result")
                if result is None:
                    raise ClusterUnavailable(f"etcd watch error: {message.get('error', message)}")
                if int(result.get("compact_revision", 0)) > 0:
                    raise Compacted(int(result["compact_revision"]))
                events = [
                    WatchEvent(_kv(event["kv"]), event.get("type") == "DELETE")
                    for event in result.get("events", [])
                ]
                if events:
                    yield events
        except (OSError, ValueError, EOFError) as exc:
            raise ClusterUnavailable(f"etcd watch ended ({endpoint}: {_reason(exc)})") from None
        finally:
            writer.close()
        raise ClusterUnavailable(f"etcd watch ended ({endpoint}: connection closed)")


class Compacted(ClusterUnavailable):
    """The watch's start revision was compacted away: read the prefix whole again."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"revision compacted (now {revision})")
        self.revision = revision


class _Unauthenticated(Exception):
    pass


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, EOFError):
        return "connection closed"
    return str(exc) or type(exc).__name__


def _revision(answer: dict[str, Any]) -> int:
    return int(answer.get("header", {}).get("revision", 0))


def _kv(item: dict[str, Any]) -> KeyValue:
    key = base64.b64decode(item["key"]).decode()
    value = base64.b64decode(item.get("value", ""))
    return KeyValue(key, value, int(item.get("mod_revision", 0)), int(item.get("lease", 0)))


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        raise ConnectionResetError("connection closed before an answer") from None
    except asyncio.LimitOverrunError:
        raise ValueError(f"answer head larger than {MAX_HEAD_BYTES} bytes") from None
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP answer: {lines[0][:40]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return b"".join([chunk async for chunk in _chunks(reader)])
    length = int(headers.get("content-length", "0"))
    if not 0 <= length <= MAX_BODY_BYTES:
        raise ValueError(f"answer body of {length} bytes")
    return await reader.readexactly(length)


async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The chunks of a chunked body (RFC 9112 section 7.1), until the last one."""
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size > MAX_BODY_BYTES:
            raise ValueError(f"chunk of {size} bytes")
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers from etcd: the final CRLF
            return
        chunk = await reader.readexactly(size + 2)
        yield chunk[:-2]


async def _messages(
    reader: asyncio.StreamReader, headers: dict[str, str]
) -> AsyncIterator[dict[str, Any]]:
    """The newline-separated JSON messages of a streamed (chunked) answer."""
    buffered = b""
    async for chunk in _chunks(reader):
        buffered += chunk
        if len(buffered) > MAX_BODY_BYTES:
            raise ValueError("watch message too large")
        *complete, buffered = buffered.split(b"\n")
        for line in complete:
            if line.strip():
                message = json.loads(line)
                if isinstance(message, dict):
                    yield message
