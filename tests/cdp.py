"""A headless Chromium driven over the DevTools protocol, with the ``websockets`` test dependency.

Why not Selenium: it needs chromedriver and a dozen more packages to do what four DevTools
commands do here (navigate, evaluate, screenshot, close), and ``websockets`` is already a test
dependency. Chromium is started with ``--remote-debugging-port=0`` (the kernel picks the port:
no race) and prints ``DevTools listening on ws://...`` on stderr; one WebSocket to the browser
carries every command, to one page target attached in flat mode.

Every wait is bounded; ``close()`` ends the browser by its pid and removes its profile.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import shutil
import tempfile
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

# Chromium's first start on a loaded box: several seconds; a command: well under one.
START_TIMEOUT_S = 30.0
COMMAND_TIMEOUT_S = 10.0
_DEVTOOLS_RE = re.compile(rb"DevTools listening on (ws://\S+)")
# Screenshots are a few hundred KB of base64; the default 1 MiB frame limit is too tight.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def chromium_path() -> str | None:
    """The Chromium binary (Debian's ``chromium``), or None when it is not installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One headless Chromium process with one page (``width`` x ``height`` CSS pixels)."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        ws: ClientConnection,
        profile: str,
        drain: asyncio.Task[None],
    ) -> None:
        self.proc = proc
        self._ws = ws
        self._drain = drain  # reads Chromium's stderr so it never blocks on a full pipe
        self._profile = profile
        self._ids = itertools.count(1)
        self._session: str | None = None

    @classmethod
    async def start(cls, binary: str, width: int = 1280, height: int = 720) -> Browser:
        profile = tempfile.mkdtemp(prefix="zdlb-chromium-")
        proc = await asyncio.create_subprocess_exec(
            binary,
            "--headless=new",
            "--no-sandbox",  # CI runs as root, where the sandbox refuses to start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "about:blank",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                url = await _devtools_url(proc)
            ws = await connect(url, max_size=MAX_MESSAGE_BYTES, open_timeout=START_TIMEOUT_S)
        except BaseException:
            await _kill(proc, profile)
            raise
        assert proc.stderr is not None
        drain = asyncio.get_running_loop().create_task(_drain(proc.stderr))
        browser = cls(proc, ws, profile, drain)
        target = await browser.send("Target.createTarget", {"url": "about:blank"})
        attached = await browser.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        browser._session = attached["sessionId"]
        await browser.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        return browser

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """One DevTools command; its result. Raises RuntimeError for a protocol error."""
        message_id = next(self._ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
        if self._session is not None:
            message["sessionId"] = self._session
        await self._ws.send(json.dumps(message))
        async with asyncio.timeout(COMMAND_TIMEOUT_S):
            while True:  # events of the page arrive in between: skipped
                reply = json.loads(await self._ws.recv())
                if reply.get("id") == message_id:
                    break
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply["result"]
        return result

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})
        await self.wait_for("document.readyState === 'complete'", timeout_s=COMMAND_TIMEOUT_S)

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page (a promise: awaited)."""
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, *, timeout_s: float, poll_s: float = 0.05) -> Any:
        """Evaluate until truthy; its value. Raises TimeoutError after ``timeout_s``."""
        async with asyncio.timeout(timeout_s):
            while True:  # a page condition: nothing to wait on but the page itself
                if value := await self.evaluate(expression):
                    return value
                await asyncio.sleep(poll_s)

    async def screenshot(self) -> bytes:
        """The page as PNG bytes."""
        result = await self.send("Page.captureScreenshot", {"format": "png"})
        return base64.b64decode(result["data"])

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._ws.close()
        await _kill(self.proc, self._profile)
        self._drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._drain


async def _devtools_url(proc: asyncio.subprocess.Process) -> str:
    assert proc.stderr is not None
    while line := await proc.stderr.readline():
        if match := _DEVTOOLS_RE.search(line):
            return match.group(1).decode()
    raise RuntimeError(f"chromium exited ({await proc.wait()}) before DevTools listened")


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


async def _kill(proc: asyncio.subprocess.Process, profile: str) -> None:
    if proc.returncode is None:
        proc.kill()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(COMMAND_TIMEOUT_S):
            await proc.wait()
    shutil.rmtree(profile, ignore_errors=True)
