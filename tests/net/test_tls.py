"""TLS termination on an HTTP listener (issue 14), with real TLS clients on loopback.

A proxy runs in-process (``proxy_harness``) with ``[listeners.web.tls]`` certificates that
``tests/tls_certs.py`` issues with the ``openssl`` command from a P-256 test CA. Clients are
Python's ``ssl`` (through asyncio streams) and curl. Every test runs on asyncio and uvloop; no
sleep waits for readiness, every wait is bounded.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
import ssl
import tracemalloc
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.net.proxy_harness import (
    BACKEND,
    LISTENER,
    WAIT_S,
    GatedServer,
    ProxyStarter,
    RunningProxy,
    eventually,
    server_entry,
)
from tests.servers import EchoServer, H11Client
from tests.tls_certs import CertAuthority, make_ca
from zdlb.config.load import parse_config
from zdlb.config.model import Config


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def certs(ca: CertAuthority, tmp_path: Path) -> Iterator[Path]:
    """A directory with three certificates: ``default`` (default.test), ``a`` (a.test),
    ``wild`` (*.b.test), each ``NAME.pem`` + ``NAME.key``."""
    own = CertAuthority(tmp_path, ca.cert, ca.key)
    own.issue("default", ["default.test", "IP:127.0.0.1"])
    own.issue("a", ["a.test"])
    own.issue("wild", ["*.b.test"])
    yield tmp_path


def tls_config(
    servers: list[dict[str, Any]],
    certs: Path,
    names: tuple[str, ...] = ("default", "a", "wild"),
    **tls: Any,
) -> Config:
    listener: dict[str, Any] = {"bind": "127.0.0.1:0", "backend": BACKEND}
    listener["tls"] = {
        "certificates": [{"cert": f"{n}.pem", "key": f"{n}.key"} for n in names],
        **tls,
    }
    data = {"listeners": {LISTENER: listener}, "backends": {BACKEND: {"servers": servers}}}
    return parse_config(data, "test_tls", certs)


@pytest.fixture
async def proxy(echo_server: EchoServer, certs: Path) -> AsyncIterator[RunningProxy]:
    async with ProxyStarter() as starter:
        config = tls_config([server_entry("e1", echo_server.addr)], certs, hsts_max_age=600)
        yield await starter.start(config)


async def tls_client(
    proxy: RunningProxy, context: ssl.SSLContext, server_name: str | None
) -> H11Client:
    async with asyncio.timeout(WAIT_S):
        reader, writer = await asyncio.open_connection(
            *proxy.addr, ssl=context, server_hostname=server_name
        )
    return H11Client(reader, writer)


def served_names(client: H11Client) -> list[str]:
    cert = client.writer.get_extra_info("peercert")
    return [value for kind, value in cert["subjectAltName"] if kind == "DNS"]


def unchecked_context(ca: CertAuthority) -> ssl.SSLContext:
    """Verifies the chain but not the name: to see which certificate a wrong SNI gets."""
    context = ca.client_context()
    context.check_hostname = False
    return context


@pytest.mark.parametrize(
    ("sni", "expected"),
    [
        ("a.test", ["a.test"]),
        ("A.Test.", ["a.test"]),
        ("x.b.test", ["*.b.test"]),
        ("default.test", ["default.test"]),
        ("y.x.b.test", ["default.test"]),  # a wildcard covers one label only
        ("unknown.test", ["default.test"]),
        (None, ["default.test"]),  # no SNI at all
    ],
)
async def test_sni_picks_the_certificate(
    proxy: RunningProxy, ca: CertAuthority, sni: str | None, expected: list[str]
) -> None:
    async with await tls_client(proxy, unchecked_context(ca), sni) as client:
        assert served_names(client) == expected
        assert client.writer.get_extra_info("ssl_object").selected_alpn_protocol() is None
        response = await client.request("GET", "/hello")
        assert response.status == 200
        assert response.header("strict-transport-security") == "max-age=600"
        sent = dict((k.lower(), v) for k, v in response.json()["headers"])
        assert sent["x-forwarded-proto"] == "https"


async def test_verified_client_keeps_alive_with_alpn(
    proxy: RunningProxy, ca: CertAuthority
) -> None:
    context = ca.client_context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    async with await tls_client(proxy, context, "a.test") as client:
        ssl_object = client.writer.get_extra_info("ssl_object")
        assert ssl_object.selected_alpn_protocol() == "http/1.1"  # never h2: not served
        assert ssl_object.version() == "TLSv1.3"
        for _ in range(3):
            assert (await client.request("GET", "/")).status == 200
        assert (await client.request("GET", "/")).header("x-conn-seq") == "1"


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
async def test_tls_1_0_and_1_1_are_refused(
    proxy: RunningProxy, ca: CertAuthority, version: ssl.TLSVersion
) -> None:
    context = unchecked_context(ca)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # else this OpenSSL would not even offer them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # that is the point
        context.minimum_version = version
        context.maximum_version = version
    # A protocol_version alert (uvloop), or the connection closed on the hello (asyncio).
    with pytest.raises((ssl.SSLError, ConnectionResetError)) as raised:
        await tls_client(proxy, context, "a.test")
    if isinstance(raised.value, ssl.SSLError):
        assert "VERSION" in str(raised.value).upper()
    assert not proxy.connections


async def test_tls_1_2_is_served_with_the_default_ciphers(
    proxy: RunningProxy, ca: CertAuthority
) -> None:
    context = ca.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    async with await tls_client(proxy, context, "x.b.test") as client:
        ssl_object = client.writer.get_extra_info("ssl_object")
        assert ssl_object.version() == "TLSv1.2"
        assert ssl_object.cipher()[0].startswith("ECDHE-ECDSA-")
        assert (await client.request("GET", "/")).status == 200


def resumed_handshakes(addr: tuple[str, int], context: ssl.SSLContext, count: int) -> list[bool]:
    """``count`` blocking connections, each offering the previous one's session (a thread's
    work: the proxy runs on the test's loop). Each sends a request and reads the answer first,
    so a TLS 1.3 ticket (sent after the handshake) has arrived."""
    session: ssl.SSLSession | None = None
    reused = []
    for _ in range(count):
        with socket.create_connection(addr, timeout=WAIT_S) as raw:
            with context.wrap_socket(raw, server_hostname="a.test", session=session) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
                while sock.recv(65536):
                    pass
                reused.append(bool(sock.session_reused))
                session = sock.session
    return reused


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_sessions_resume(
    proxy: RunningProxy, ca: CertAuthority, version: ssl.TLSVersion
) -> None:
    context = ca.client_context()
    context.minimum_version = context.maximum_version = version
    reused = await asyncio.to_thread(resumed_handshakes, proxy.addr, context, 3)
    assert reused == [False, True, True]


@pytest.mark.parametrize("sni", ["a.test", "x.b.test"])
async def test_httpx_client(proxy: RunningProxy, ca: CertAuthority, sni: str) -> None:
    """httpx (httpcore over anyio) verifies each certificate for the SNI name it sends, and
    keeps its connection alive across requests."""
    url = f"https://127.0.0.1:{proxy.addr[1]}/x"
    async with httpx.AsyncClient(verify=ca.client_context(), timeout=WAIT_S) as client:
        responses = [await client.get(url, extensions={"sni_hostname": sni}) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert [r.headers["x-conn-seq"] for r in responses] == ["1", "1", "1"]
    assert responses[0].http_version == "HTTP/1.1"
    assert responses[0].headers["strict-transport-security"] == "max-age=600"


async def test_curl_gets_each_certificate(proxy: RunningProxy, ca: CertAuthority) -> None:
    port = proxy.addr[1]
    for name, body_name in (("a.test", "a.test"), ("www.b.test", "www.b.test")):
        process = await asyncio.create_subprocess_exec(
            "curl", "-sS", "--http1.1", "--cacert", str(ca.cert),
            "--resolve", f"{name}:{port}:127.0.0.1",
            "-w", "\n%{http_version} %{ssl_verify_result}", f"https://{name}:{port}/x",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(WAIT_S):
            out, err = await process.communicate()
        assert process.returncode == 0, err
        body, status = out.rsplit(b"\n", 1)
        assert status == b"1.1 0"
        sent = dict((k.lower(), v) for k, v in json.loads(body)["headers"])
        assert sent["host"] == f"{body_name}:{port}"
        assert sent["x-forwarded-proto"] == "https"


async def test_curl_resumes_a_session(proxy: RunningProxy, ca: CertAuthority) -> None:
    """Two URLs in one curl run: the second connection (``Connection: close`` forces one)
    resumes the first's TLS 1.2 session, which curl reports in its verbose output."""
    port = proxy.addr[1]
    url = f"https://a.test:{port}/"
    process = await asyncio.create_subprocess_exec(
        "curl", "-sv", "--tlsv1.2", "--tls-max", "1.2", "--cacert", str(ca.cert),
        "--resolve", f"a.test:{port}:127.0.0.1", "-H", "Connection: close", url, url,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(WAIT_S):
        _, err = await process.communicate()
    assert process.returncode == 0, err
    assert b"SSL re-using session ID" in err or b"SSL reusing session" in err, err


# --- bad input -----------------------------------------------------------------------------


async def test_plaintext_request_on_the_tls_port(proxy: RunningProxy) -> None:
    reader, writer = await asyncio.open_connection(*proxy.addr)
    writer.write(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
    async with asyncio.timeout(WAIT_S):
        data = await reader.read()  # the server answers with a TLS alert at most, then EOF
    assert not data.startswith(b"HTTP/")
    writer.close()
    await eventually(lambda: not proxy.connections)


async def test_close_notify_during_a_request_is_quiet(
    bound_socket: socket.socket,
    certs: Path,
    ca: CertAuthority,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A TLS client that closes (close_notify) while its request is at the server: the
    connection ends, and nothing is logged about eof_received (asyncio and uvloop warn when it
    returns True on a TLS transport, as a plain half-close would)."""
    async with GatedServer(bound_socket) as gated, ProxyStarter() as starter:
        proxy = await starter.start(tls_config([server_entry("g1", gated.addr)], certs))
        client = await tls_client(proxy, ca.client_context(), "a.test")
        client.writer.write(b"GET /hold HTTP/1.1\r\nHost: a.test\r\n\r\n")
        await gated.wait_until(lambda: gated.held == 1)
        client.writer.close()
        await eventually(lambda: not proxy.connections)
        gated.release.set()
    assert not [r for r in caplog.records if "eof_received" in r.getMessage()]


async def test_truncated_handshake(proxy: RunningProxy, ca: CertAuthority) -> None:
    """The first bytes of a real ClientHello, then a FIN: closed, nothing logged as error."""
    hello = ssl.MemoryBIO()
    client = ca.client_context().wrap_bio(ssl.MemoryBIO(), hello, server_hostname="a.test")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    record = hello.read()
    reader, writer = await asyncio.open_connection(*proxy.addr)
    writer.write(record[: len(record) // 2])
    writer.write_eof()
    async with asyncio.timeout(WAIT_S):
        assert await reader.read() == b""
    writer.close()
    assert not proxy.connections


@pytest.fixture
async def slow_proxy(echo_server: EchoServer, certs: Path) -> AsyncIterator[RunningProxy]:
    async with ProxyStarter() as starter:
        config = tls_config([server_entry("e1", echo_server.addr)], certs, handshake_s=0.2)
        yield await starter.start(config)


@pytest.mark.parametrize("sent", [b"", b"\x16\x03\x01\x02\x00\x01"], ids=["nothing", "partial"])
async def test_stalled_handshake_is_closed(slow_proxy: RunningProxy, sent: bytes) -> None:
    reader, writer = await asyncio.open_connection(*slow_proxy.addr)
    writer.write(sent)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(WAIT_S):
        assert await reader.read() == b""
    assert 0.15 <= loop.time() - started < 2.0
    writer.close()


async def test_thousand_handshakes_dropped(
    proxy: RunningProxy, ca: CertAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    """1,000 connections, each dropped at another stage (before the hello, mid-hello, after
    the handshake, after a request): no traceback, no connection left, fds back, and what
    zdlb's code holds (tracemalloc) within 64 KiB of before, pools and caches warmed first."""
    context = ca.client_context()

    async def one(index: int) -> None:
        stage = index % 4
        if stage < 2:
            _, writer = await asyncio.open_connection(*proxy.addr)
            if stage == 1:
                writer.write(b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03")
            writer.transport.abort()
            return
        client = await tls_client(proxy, context, "a.test")
        if stage == 3:
            assert (await client.request("GET", "/")).status == 200
        client.writer.transport.abort()

    async def rounds(count: int) -> None:
        for start in range(0, count, 50):
            async with asyncio.timeout(WAIT_S):
                await asyncio.gather(*(one(i) for i in range(start, start + 50)))
        await eventually(lambda: not proxy.connections)

    await rounds(100)  # warm: pools, caches, the loop's own structures
    fds_before = open_fds()
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.take_snapshot()
        await rounds(1000)
        await eventually(lambda: open_fds() <= fds_before)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    # zdlb's own allocations only: the fixture server keeps every request it saw, by design.
    only_zdlb = [tracemalloc.Filter(True, "*/zdlb/*")]
    grown = sum(
        stat.size_diff
        for stat in after.filter_traces(only_zdlb).compare_to(
            before.filter_traces(only_zdlb), "filename"
        )
    )
    assert grown < 64 * 1024, f"{grown} bytes more held by zdlb's code"  # idle pool: <= 64
    assert not [r for r in caplog.records if r.exc_info is not None]


# --- certificates replaced on disk ---------------------------------------------------------


def serial_of(client: H11Client) -> str:
    return str(client.writer.get_extra_info("peercert")["serialNumber"])


async def new_connection_serial(proxy: RunningProxy, ca: CertAuthority) -> str:
    async with await tls_client(proxy, ca.client_context(), "a.test") as client:
        return serial_of(client)


@pytest.fixture
async def watching_proxy(echo_server: EchoServer, certs: Path) -> AsyncIterator[RunningProxy]:
    async with ProxyStarter() as starter:
        config = tls_config([server_entry("e1", echo_server.addr)], certs, watch_s=0.05)
        yield await starter.start(config)


async def test_replaced_certificate_serves_new_connections(
    watching_proxy: RunningProxy,
    ca: CertAuthority,
    certs: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Within ``watch_s`` of a renewal, new handshakes get the new certificate; a keep-alive
    connection made before goes on with the old session."""
    proxy = watching_proxy
    caplog.set_level("INFO", logger="zdlb.tls")
    async with await tls_client(proxy, ca.client_context(), "a.test") as kept:
        old_serial = serial_of(kept)
        assert (await kept.request("GET", "/")).status == 200
        CertAuthority(certs, ca.cert, ca.key).issue("a", ["a.test", "new.a.test"])
        serials: list[str] = []

        async def renewed() -> bool:
            serials.append(await new_connection_serial(proxy, ca))
            return serials[-1] != old_serial

        async with asyncio.timeout(WAIT_S):
            while not await renewed():  # noqa: ASYNC110  (each try is a real handshake)
                await asyncio.sleep(0.02)
        response = await kept.request("GET", "/")
        assert response.status == 200 and response.header("x-conn-seq") == "1"
        assert serial_of(kept) == old_serial
    loaded = [r.getMessage() for r in caplog.records if "tls_certificates_loaded" in r.msg]
    assert loaded and "reason=files changed" in loaded[-1] and "new.a.test" in loaded[-1]


async def test_broken_replacement_keeps_the_served_certificate(
    watching_proxy: RunningProxy,
    ca: CertAuthority,
    certs: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = watching_proxy
    serial = await new_connection_serial(proxy, ca)
    key = (certs / "a.key").read_bytes()
    (certs / "a.key").write_bytes((certs / "wild.key").read_bytes())  # not a's key

    def failed() -> bool:
        return any("tls_reload_failed" in r.msg for r in caplog.records)

    async with asyncio.timeout(WAIT_S):
        while not failed():
            assert await new_connection_serial(proxy, ca) == serial
            await asyncio.sleep(0.02)
    message = next(r.getMessage() for r in caplog.records if "tls_reload_failed" in r.msg)
    assert "the key does not belong to the certificate" in message
    assert await new_connection_serial(proxy, ca) == serial
    (certs / "a.key").write_bytes(key)
