"""``TerminatingContext`` alone (tls/listener.py): a listener's TLS settings and certificates
change for new handshakes without re-listening, as a reload or a renewal makes them change.
A bare asyncio/uvloop server with the context, real TLS clients, loopback only."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
from collections.abc import AsyncIterator

import pytest

from tests.net.proxy_harness import WAIT_S
from tests.tls_certs import CertAuthority, make_ca
from zdlb.config.model import ListenerTlsConfig, TlsVersion
from zdlb.tls.certs import inspect_pair
from zdlb.tls.listener import TerminatingContext


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    authority = make_ca(tmp_path_factory.mktemp("ca"))
    authority.issue("one", ["one.test"])
    authority.issue("two", ["two.test"])
    return authority


def tls_of(ca: CertAuthority, *names: str, **policy: object) -> ListenerTlsConfig:
    certs = tuple(inspect_pair(ca.directory / f"{n}.pem", ca.directory / f"{n}.key") for n in names)
    return dataclasses.replace(ListenerTlsConfig(certificates=certs), **policy)  # type: ignore[arg-type]


class Holder:
    def __init__(self, config: ListenerTlsConfig) -> None:
        self.config = config


async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"hi")
    await writer.drain()
    writer.close()


@pytest.fixture
async def served(
    ca: CertAuthority, bound_socket: socket.socket
) -> AsyncIterator[tuple[Holder, tuple[str, int]]]:
    holder = Holder(tls_of(ca, "one"))
    context = TerminatingContext("web", lambda: holder.config)
    server = await asyncio.start_server(hello, sock=bound_socket, ssl=context)
    async with server:
        yield holder, bound_socket.getsockname()[:2]


async def handshake(addr: tuple[str, int], context: ssl.SSLContext, name: str) -> str:
    """The first DNS name of the certificate served to ``name``."""
    async with asyncio.timeout(WAIT_S):
        reader, writer = await asyncio.open_connection(*addr, ssl=context, server_hostname=name)
        assert await reader.read() == b"hi"
        cert = writer.get_extra_info("peercert")
        writer.close()
    return str(next(value for kind, value in cert["subjectAltName"] if kind == "DNS"))


async def test_a_new_config_serves_new_handshakes(
    served: tuple[Holder, tuple[str, int]], ca: CertAuthority
) -> None:
    holder, addr = served
    context = ca.client_context()
    context.check_hostname = False
    assert await handshake(addr, context, "two.test") == "one.test"  # the default
    holder.config = tls_of(ca, "one", "two")  # a reload adds a certificate
    assert await handshake(addr, context, "two.test") == "two.test"
    tls12 = ca.client_context()
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    assert await handshake(addr, tls12, "one.test") == "one.test"
    holder.config = tls_of(ca, "one", "two", min_version=TlsVersion.TLS1_3)  # policy too
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await handshake(addr, tls12, "one.test")
    assert await handshake(addr, ca.client_context(), "one.test") == "one.test"


def test_no_tls_table_is_an_error() -> None:
    from zdlb.errors import CertificateError

    with pytest.raises(CertificateError, match="listener web has no"):
        TerminatingContext("web", lambda: None)
