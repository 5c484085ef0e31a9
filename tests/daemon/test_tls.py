"""TLS on the real daemon (issue 14): ``zdlb check`` lists what each TLS listener serves and
refuses a bad pair with its key path; a reload (``zdlb ctl reload`` and SIGHUP) serves renewed
certificates to new connections while a keep-alive connection goes on; ``show info`` and
``/metrics`` show the expiry; with workers, every worker serves TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.daemon.conftest import Daemon, ServerSpec, StartDaemon, render_config
from tests.daemon.test_control import SOCKET_NAME, run_zdlb
from tests.daemon.test_upgrade import EXIT_S, old_exits, upgrade
from tests.servers import EchoServer, H11Client
from tests.tls_certs import CertAuthority, make_ca

WAIT_S = 5.0


@pytest.fixture
async def successors() -> AsyncIterator[list[int]]:
    """Pids of upgraded processes (not the test's children), killed at teardown."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def ca(tmp_path: Path) -> CertAuthority:
    authority = make_ca(tmp_path)
    authority.issue("site", ["site.test", "*.site.test"], days=10)  # expiring: < 14 days
    authority.issue("other", ["other.test"])
    return authority


def tls_config(echo: EchoServer, *, extra: str = "", workers: int = 1, grace_s: float = 5.0) -> str:
    tls = (
        "\n[listeners.web.tls]\n"
        'certificates = [{cert = "site.pem", key = "site.key"}, {cert = "other.pem"'
        ', key = "other.key"}]\n'
        f"{extra}"
    )
    text = render_config([ServerSpec("s1", echo.addr)], listener_extra=tls, grace_s=grace_s)
    return f'workers = {workers}\n[control]\nsocket = "{SOCKET_NAME}"\n' + text


async def tls_client(addr: tuple[str, int], ca: CertAuthority, name: str) -> H11Client:
    async with asyncio.timeout(WAIT_S):
        reader, writer = await asyncio.open_connection(
            *addr, ssl=ca.client_context(), server_hostname=name
        )
    return H11Client(reader, writer)


def serial(client: H11Client) -> str:
    return str(client.writer.get_extra_info("peercert")["serialNumber"])


async def test_check_lists_names_and_expiry(echo_server: EchoServer, ca: CertAuthority) -> None:
    config = ca.directory / "zdlb.toml"
    config.write_text(tls_config(echo_server))
    result = await run_zdlb("check", "-c", str(config))
    assert result.returncode == 0, result
    assert "web: TLS >= 1.2, alpn=http/1.1, tickets" in result.stdout
    assert re.search(r"site\.test, \*\.site\.test \(default\): EXPIRING expires", result.stdout)
    assert re.search(r"other\.test: expires \S+ \S+ UTC \(in 30 days\)", result.stdout)


async def test_check_refuses_a_mismatched_pair(echo_server: EchoServer, ca: CertAuthority) -> None:
    config = ca.directory / "zdlb.toml"
    config.write_text(tls_config(echo_server).replace('key = "other.key"', 'key = "site.key"'))
    result = await run_zdlb("check", "-c", str(config))
    assert result.returncode == 2
    assert (
        f"listeners.web.tls.certificates[1]: {ca.directory}/other.pem + {ca.directory}/site.key:"
        " the key does not belong to the certificate"
    ) in result.stderr


async def start(start_daemon: StartDaemon, config: Path, *workers: str) -> Daemon:
    daemon = await start_daemon("run", "-c", str(config), *workers)
    await daemon.wait_text("tls_certificate_expiring listener=web")  # site: 10 days
    return daemon


@pytest.mark.parametrize("how", ["ctl", "sighup"])
async def test_reload_serves_renewed_certificates(
    start_daemon: StartDaemon, echo_server: EchoServer, ca: CertAuthority, how: str
) -> None:
    config = ca.directory / "zdlb.toml"
    config.write_text(tls_config(echo_server))  # watch_s 60: only the reload looks
    daemon = await start(start_daemon, config)
    addr = await daemon.listener_addr()
    async with await tls_client(addr, ca, "www.site.test") as kept:
        old = serial(kept)
        assert (await kept.request("GET", "/")).status == 200
        ca.issue("site", ["site.test", "*.site.test"], days=60)
        if how == "ctl":
            result = await run_zdlb("ctl", "-c", str(config), "reload")
            assert result.returncode == 0, result
        else:
            daemon.send_signal(signal.SIGHUP)
        await daemon.wait_text("reload_done uid=")  # changes=listener web changed: tls
        async with await tls_client(addr, ca, "site.test") as fresh:  # its handshake rebuilds
            assert serial(fresh) != old
            assert (await fresh.request("GET", "/")).status == 200
        await daemon.wait_text("tls_certificates_loaded listener=web reason=reload")
        response = await kept.request("GET", "/")
        assert response.status == 200 and serial(kept) == old
    info = await run_zdlb("ctl", "-c", str(config), "show", "info")
    assert re.search(r"tls_certificates\s+2", info.stdout), info
    assert re.search(r"tls_expiring\s+none", info.stdout), info


async def test_reload_refuses_a_broken_pair_and_keeps_serving(
    start_daemon: StartDaemon, echo_server: EchoServer, ca: CertAuthority
) -> None:
    config = ca.directory / "zdlb.toml"
    config.write_text(tls_config(echo_server))
    daemon = await start(start_daemon, config)
    addr = await daemon.listener_addr()
    async with await tls_client(addr, ca, "site.test") as before:
        old = serial(before)
    (ca.directory / "site.key").write_bytes((ca.directory / "other.key").read_bytes())
    result = await run_zdlb("ctl", "-c", str(config), "reload")
    assert result.returncode == 1
    assert "listeners.web.tls.certificates[0]:" in result.stdout + result.stderr
    assert "the key does not belong to the certificate" in result.stdout + result.stderr
    async with await tls_client(addr, ca, "site.test") as after:
        assert serial(after) == old
        assert (await after.request("GET", "/")).status == 200
    info = await run_zdlb("ctl", "-c", str(config), "show", "info")
    assert re.search(
        r"tls_expiring\s+site\.test,\*\.site\.test \(web\) in (9\.\d|10\.0) days", info.stdout
    )


async def test_workers_serve_tls_and_export_expiry(
    start_daemon: StartDaemon, echo_server: EchoServer, ca: CertAuthority
) -> None:
    config = ca.directory / "zdlb.toml"
    config.write_text(tls_config(echo_server, workers=2) + '\n[metrics]\nlisten = "127.0.0.1:0"\n')
    daemon = await start_daemon("run", "-c", str(config), "--workers", "2")
    addr = await daemon.listener_addr()
    for _ in range(4):  # the kernel spreads connections over both workers' sockets
        async with await tls_client(addr, ca, "other.test") as client:
            assert (await client.request("GET", "/")).status == 200
    line = await daemon.wait_text("metrics_started")
    match = re.search(r"addr=(\S+):(\d+)", line)
    assert match is not None
    reader, writer = await asyncio.open_connection(match[1], int(match[2]))
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(WAIT_S):
        text = (await reader.read()).decode()
    writer.close()
    series = re.findall(r"^zdlb_tls_certificate_expiry_seconds\{(.*)\} (\S+)$", text, re.M)
    names = {re.search(r'names="([^"]*)"', labels)[1]: float(value) for labels, value in series}  # type: ignore[index]
    assert 9 * 86400 < names["site.test,*.site.test"] < 10 * 86400
    assert 29 * 86400 < names["other.test"] < 30 * 86400


async def test_upgrade_leaves_idle_tls_connections_with_the_old_process(
    start_daemon: StartDaemon,
    echo_server: EchoServer,
    ca: CertAuthority,
    successors: list[int],
) -> None:
    """A TLS session cannot move to another process: after ``zdlb ctl upgrade`` the idle TLS
    connection stays with the old process, whose answer to its next request says
    ``Connection: close``; new connections reach the new process."""
    config = ca.directory / "zdlb.toml"
    config.write_text(tls_config(echo_server, grace_s=3.0))
    daemon = await start(start_daemon, config)
    addr = await daemon.listener_addr()
    async with await tls_client(addr, ca, "site.test") as kept:
        assert (await kept.request("GET", "/")).status == 200
        code, out, err = await upgrade(config, successors)
        assert code == 0, (out, err)
        await daemon.wait_text("upgrade_connections_handed_over count=0")
        response = await kept.request("GET", "/")
        assert response.status == 200 and response.header("connection") == "close"
    assert await old_exits(daemon) == 0
    async with await tls_client(addr, ca, "site.test") as fresh:
        assert (await fresh.request("GET", "/")).status == 200
    info = await run_zdlb("ctl", "-c", str(config), "json", "show", "info")
    assert json.loads(info.stdout)["pid"] == successors[-1]
    os.kill(successors[-1], signal.SIGTERM)
    await daemon.wait_text("INFO zdlb.daemon.cli stopped", timeout_s=EXIT_S)


def test_ssl_module_has_no_ocsp_stapling() -> None:
    """README: the stdlib cannot staple OCSP answers on the server side."""
    assert not [name for name in dir(ssl.SSLContext) if "ocsp" in name.lower() or "status" in name]
