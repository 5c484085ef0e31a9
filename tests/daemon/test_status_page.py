"""The status page of a real ``zdlb run``, in a real headless Chromium (tests/cdp.py).

A demo-like daemon (two hosts, each a main vhost and its paired backup, sticky cookie, HTTP
checks, control socket, metrics listener on port 0) serves the four demo vhosts of this test's
loop. Chromium loads ``/``; the test reads the DOM as a person reads the page, flips front-1
with the real ``zdlb ctl`` and sees, without a reload, the pair serve front-1 and the flip on
the timeline within 2 s. The screenshot it takes then is kept in ``build/artifacts/`` (the
README's ``docs/status-page.png`` is one of them).

Skipped, saying why, where Chromium is not installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.cdp import Browser, chromium_path
from tests.daemon.conftest import (
    REPO_ROOT,
    START_TIMEOUT_S,
    Daemon,
    ServerSpec,
    StartDaemon,
    render_config,
)
from tests.daemon.test_control import run_zdlb
from tests.servers import LOOPBACK, H11Client
from zdlb.daemon.demo_app import DemoVhostServer, serve_demo_vhost

WriteConfig = Callable[[str], Path]
ARTIFACTS = REPO_ROOT / "build" / "artifacts"
# The promise: a flip shows on an open page within 2 s, without a reload.
FLIP_VISIBLE_S = 2.0
# The page's first render: Chromium's start, then one poll.
FIRST_RENDER_S = 15.0
HOSTS = ("front-1", "front-2")
# Background traffic while the page is watched, so its counters move: bounded in both ways.
LOAD_RATE = 50
LOAD_MAX = 2000
CHECK = """
[backends.app.check]
kind = "http"
path = "/health"
interval_s = 0.2
fast_interval_s = 0.1
timeout_s = 1
rise = 1
fall = 1

[backends.app.sticky]
cookie = "SERVERID"
"""

pytestmark = pytest.mark.slow


@pytest.fixture
async def demo_vhosts(
    bound_socket_factory: Callable[[], socket.socket],
) -> AsyncIterator[dict[str, DemoVhostServer]]:
    """front-1, front-2 (v1, main vhosts) and their backups (v2), on port-0 sockets."""
    vhosts = {}
    for host in HOSTS:
        vhosts[host] = await serve_demo_vhost(host, "main", "v1", bound_socket_factory())
        vhosts[f"{host}-backup"] = await serve_demo_vhost(
            host, "backup", "v2", bound_socket_factory()
        )
    yield vhosts
    for vhost in vhosts.values():
        vhost.close()
    for vhost in vhosts.values():
        await vhost.wait_closed()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    binary = chromium_path()
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    started = await Browser.start(binary)
    yield started
    await started.close()


async def start_demo_daemon(
    start_daemon: StartDaemon,
    write_config: WriteConfig,
    vhosts: dict[str, DemoVhostServer],
    workers: int = 1,
    admin: bool = False,
) -> tuple[Daemon, Path, tuple[str, int], str]:
    specs = []
    for host in HOSTS:
        specs.append(ServerSpec(host, _addr(vhosts[host])))
    for host in HOSTS:
        backup = vhosts[f"{host}-backup"]
        specs.append(ServerSpec(f"{host}-backup", _addr(backup), "backup", pair=host))
    text = render_config(specs, backend_extra=CHECK)
    text += '\n[control]\nsocket = "ctl.sock"\n'
    text += f'\n[metrics]\nlisten = "{LOOPBACK}:0"\nadmin = {str(admin).lower()}\n'
    config = write_config(text)
    daemon = await start_daemon("run", "--workers", str(workers), "-c", str(config))
    addr = await daemon.listener_addr("web", timeout_s=START_TIMEOUT_S)
    line = await daemon.wait_text("metrics_started")
    match = re.search(r"addr=(\S+:\d+)", line)
    assert match is not None, line
    return daemon, config, addr, f"http://{match[1]}"


def _addr(vhost: DemoVhostServer) -> tuple[str, int]:
    return (LOOPBACK, vhost.spec.port)


SERVING = "document.querySelector('tr[data-host=\"{host}\"]')?.dataset.serving"
MEMBERS = """JSON.stringify([...document.querySelectorAll('[data-server]')].map(
    m => [m.dataset.server, m.dataset.admin, m.dataset.health, m.dataset.serving]))"""


async def test_page_shows_servers_and_a_flip_live(
    start_daemon: StartDaemon,
    write_config: WriteConfig,
    demo_vhosts: dict[str, DemoVhostServer],
    browser: Browser,
) -> None:
    daemon, config, addr, base = await start_demo_daemon(start_daemon, write_config, demo_vhosts)
    stop_load = asyncio.Event()
    load = asyncio.get_running_loop().create_task(_load(addr, stop_load))
    try:
        await _watch_a_flip(browser, config, base)
    finally:
        stop_load.set()
        answered = await load
    assert answered > 0
    assert "Traceback" not in daemon.output


async def _load(addr: tuple[str, int], stop: asyncio.Event) -> int:
    """Paced requests (LOAD_RATE a second) until ``stop`` or LOAD_MAX: req/s on the page."""
    answered = 0
    async with await H11Client.connect(addr) as client:
        while answered < LOAD_MAX and not stop.is_set():
            assert (await client.request("GET", "/")).status == 200
            answered += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1 / LOAD_RATE):
                    await stop.wait()
    return answered


async def _watch_a_flip(browser: Browser, config: Path, base: str) -> None:
    await browser.navigate(base + "/")
    await browser.wait_for(SERVING.format(host="front-1"), timeout_s=FIRST_RENDER_S)
    # Every member probed once (the first probes are jittered over interval_s).
    await browser.wait_for(
        "[...document.querySelectorAll('[data-server] .check')]"
        ".filter(c => c.textContent.startsWith('check: ok 200')).length === 4",
        timeout_s=FIRST_RENDER_S,
    )
    members = json.loads(await browser.evaluate(MEMBERS))
    assert members == [
        ["app/front-1", "ready", "up", "true"],
        ["app/front-1-backup", "ready", "up", "false"],
        ["app/front-2", "ready", "up", "true"],
        ["app/front-2-backup", "ready", "up", "false"],
    ]
    assert await browser.evaluate("document.title") == "zdlb status"

    # No reload from here on: a marker set on the window must survive the flip.
    await browser.evaluate("window.zdlbMarker = 'same page'")
    result = await run_zdlb("ctl", "-c", str(config), "flip", "app/front-1")
    assert result.returncode == 0, result
    await browser.wait_for(
        SERVING.format(host="front-1") + " === 'front-1-backup'", timeout_s=FLIP_VISIBLE_S
    )
    await browser.wait_for(
        "document.querySelector('#events li[data-kind=\"flip\"]')?.textContent"
        ".includes('front-1-backup serves front-1')",
        timeout_s=FLIP_VISIBLE_S,
    )
    assert await browser.evaluate("window.zdlbMarker") == "same page"
    members = json.loads(await browser.evaluate(MEMBERS))
    assert members[:2] == [
        ["app/front-1", "maint", "up", "false"],
        ["app/front-1-backup", "ready", "up", "true"],
    ]
    assert await browser.evaluate(SERVING.format(host="front-2")) == "front-2"
    # Newest first: the flip is above the admin change it made.
    kinds = await browser.evaluate(
        "[...document.querySelectorAll('#events li')].map(li => li.dataset.kind)"
    )
    assert kinds == ["flip", "admin"], kinds  # the pair was ready already: one change

    png = await browser.screenshot()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "status-page-flip.png").write_bytes(png)


async def test_status_json_with_workers_is_the_masters(
    start_daemon: StartDaemon,
    write_config: WriteConfig,
    demo_vhosts: dict[str, DemoVhostServer],
) -> None:
    """Two workers proxy; the master's document counts their requests and its timeline has
    the flip (the master owns control and checks)."""
    daemon, config, addr, base = await start_demo_daemon(
        start_daemon, write_config, demo_vhosts, workers=2
    )
    metrics = _host_port(base)
    async with await H11Client.connect(addr) as client:
        for _ in range(10):
            assert (await client.request("GET", "/")).status == 200
    result = await run_zdlb("ctl", "-c", str(config), "flip", "app/front-2")
    assert result.returncode == 0, result
    async with asyncio.timeout(FIRST_RENDER_S):
        while True:  # worker reports arrive every 0.1 s; the document is cached 0.25 s
            doc = await _status_json(metrics)
            members = [m for host in doc["backends"][0]["hosts"] for m in host["members"]]
            if sum(m["requests"] for m in members) >= 10:
                break
            await asyncio.sleep(0.1)
    hosts = {host["host"]: host for host in doc["backends"][0]["hosts"]}
    assert hosts["front-2"]["serving"] == "front-2-backup"
    assert hosts["front-1"]["serving"] == "front-1"
    assert [e["kind"] for e in doc["events"][:2]] == ["flip", "admin"]
    assert "Traceback" not in daemon.output


def _host_port(base: str) -> tuple[str, int]:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def _status_json(metrics: tuple[str, int]) -> dict[str, Any]:
    async with await H11Client.connect(metrics) as client:
        response = await client.request("GET", "/status.json")
    assert response.status == 200, response
    doc: dict[str, Any] = json.loads(response.body)
    return doc


async def test_admin_buttons_flip_and_a_foreign_page_cannot(
    start_daemon: StartDaemon,
    write_config: WriteConfig,
    demo_vhosts: dict[str, DemoVhostServer],
    browser: Browser,
) -> None:
    """``admin = true``: the page's flip button works; a page of another origin (a demo vhost,
    another port) cannot make the browser do the same, with or without the custom header."""
    daemon, _, _, base = await start_demo_daemon(
        start_daemon, write_config, demo_vhosts, admin=True
    )
    foreign = f"http://{LOOPBACK}:{demo_vhosts['front-2'].spec.port}/"
    await browser.navigate(foreign)
    attempts = await browser.evaluate(
        FOREIGN_ATTEMPTS.replace("ACTION_URL", base + "/status/action")
    )
    # With the header: the CORS preflight is refused, nothing is sent. Without: 403 (the
    # no-cors answer is opaque to the page, status 0), and either way nothing changed.
    assert attempts == ["blocked", 0], attempts
    doc = await _status_json(_host_port(base))
    hosts = {host["host"]: host for host in doc["backends"][0]["hosts"]}
    assert hosts["front-1"]["serving"] == "front-1"
    assert doc["events"] == []

    await browser.navigate(base + "/")
    button = 'document.querySelector(\'button[data-action="flip"][data-target="app/front-1"]\')'
    await browser.wait_for(button + " !== null", timeout_s=FIRST_RENDER_S)
    await browser.evaluate(button + ".click(); true")
    await browser.wait_for(
        SERVING.format(host="front-1") + " === 'front-1-backup'", timeout_s=FLIP_VISIBLE_S
    )
    assert "uid=-1" in await daemon.wait_text("server_admin server=app/front-1")
    assert "Traceback" not in daemon.output


# Run in the foreign page: a cross-origin POST with the custom header (needs a preflight the
# endpoint never grants), then a "simple" one without it (sent, refused with 403).
FOREIGN_ATTEMPTS = """(async () => {
  const body = JSON.stringify({action: "flip", server: "app/front-1"});
  const results = [];
  try {
    await fetch("ACTION_URL", {method: "POST", body,
      headers: {"X-Zdlb-Action": "1", "Content-Type": "application/json"}});
    results.push("sent");
  } catch (err) { results.push("blocked"); }
  const simple = await fetch("ACTION_URL", {method: "POST", mode: "no-cors", body,
    headers: {"Content-Type": "text/plain"}});
  results.push(simple.status);
  return results;
})()"""


async def test_zdlb_ctl_show_status_is_the_pages_document(
    start_daemon: StartDaemon,
    write_config: WriteConfig,
    demo_vhosts: dict[str, DemoVhostServer],
) -> None:
    """One source of truth: `zdlb ctl --json show status` answers /status.json's document."""
    daemon, config, _, base = await start_demo_daemon(start_daemon, write_config, demo_vhosts)
    result = await run_zdlb("ctl", "-c", str(config), "flip", "app/front-1")
    assert result.returncode == 0, result
    shown = await run_zdlb("ctl", "-c", str(config), "--json", "show", "status")
    assert shown.returncode == 0, shown
    from_ctl = json.loads(shown.stdout)
    from_page = await _status_json(_host_port(base))

    def states(doc: dict[str, Any]) -> list[tuple[str, str, list[tuple[str, str, str]]]]:
        return [
            (h["host"], h["serving"], [(m["name"], m["admin"], m["health"]) for m in h["members"]])
            for b in doc["backends"]
            for h in b["hosts"]
        ]

    assert states(from_ctl) == states(from_page)  # (rates and ages move between the two reads)
    assert from_ctl["events"][0]["kind"] == from_page["events"][0]["kind"] == "flip"
    hosts = {host["host"]: host for host in from_ctl["backends"][0]["hosts"]}
    assert hosts["front-1"]["serving"] == "front-1-backup"
    text = await run_zdlb("ctl", "-c", str(config), "show", "status")
    assert text.returncode == 0 and "front-1-backup" in text.stdout, text
    assert "Traceback" not in daemon.output
