"""Shared fixtures: pre-bound sockets, the upstream servers of ``tests/servers.py``, loop choice.

- Sockets are bound to 127.0.0.1 port 0 by a fixture and handed over bound (and listening), so
  no test ever picks a "free" port and races another process for it.
- Every asyncio test runs on a fresh loop whose exception handler records each call; the
  autouse ``loop_errors`` fixture fails the test if anything was recorded. A test that provokes
  such an error on purpose requests ``loop_errors``, asserts on it, and clears it.
- Tests under ``tests/net/`` run twice, on the stdlib loop and on uvloop (ids ``[asyncio]`` and
  ``[uvloop]``), through pytest-asyncio's ``pytest_asyncio_loop_factories`` hook. Overriding the
  ``event_loop_policy`` fixture would do the same, but pytest-asyncio 1.x deprecates it with a
  warning, which ``filterwarnings = error`` makes fatal.

Nothing here mocks a socket, a transport or the loop, or sleeps to wait for readiness.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import uvloop

from tests.servers import (
    LOOPBACK,
    DribbleServer,
    EchoServer,
    GarbageServer,
    ResetServer,
    SilentServer,
    StaleKeepAliveServer,
    TcpEchoServer,
    TruncatingServer,
    refused_address,
)

TESTS_DIR = Path(__file__).parent
# Test directories whose asyncio tests run on every loop implementation zdlb supports.
MULTI_LOOP_DIRS = frozenset({"net"})
# Listen backlog of fixture sockets: tests open a handful of connections at a time, but a
# connection storm test must not see SYNs dropped because of the fixture.
FIXTURE_BACKLOG = 128

LoopFactory = Callable[[], asyncio.AbstractEventLoop]
# Exception-handler contexts recorded since the current test began; see ``loop_errors``.
_loop_error_contexts: list[dict[str, Any]] = []


def _record_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    _loop_error_contexts.append(context)
    loop.default_exception_handler(context)  # still logged, with its traceback


def _guarded(factory: LoopFactory) -> LoopFactory:
    def new_guarded_loop() -> asyncio.AbstractEventLoop:
        loop = factory()
        loop.set_exception_handler(_record_loop_error)
        return loop

    return new_guarded_loop


LOOP_FACTORIES: dict[str, LoopFactory] = {
    "asyncio": _guarded(asyncio.new_event_loop),
    "uvloop": _guarded(uvloop.new_event_loop),
}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, LoopFactory]:
    """Both loops for tests under a ``MULTI_LOOP_DIRS`` directory, the stdlib one elsewhere."""
    try:
        top = item.path.relative_to(TESTS_DIR).parts[0]
    except (ValueError, IndexError):
        top = ""
    if top in MULTI_LOOP_DIRS:
        return LOOP_FACTORIES
    return {"asyncio": LOOP_FACTORIES["asyncio"]}


@pytest.fixture(autouse=True)
def loop_errors(request: pytest.FixtureRequest) -> Iterator[list[dict[str, Any]]]:
    """Fail the test if the loop's exception handler was called, even while the loop closed.

    Autouse fixtures are set up before pytest-asyncio's loop runner, so this teardown runs after
    the loop is closed and also sees errors from tasks cancelled at loop shutdown. For asyncio
    tests it also pulls in ``no_leaked_tasks``.
    """
    _loop_error_contexts.clear()
    if pytest_asyncio.is_async_test(request.node):
        request.getfixturevalue(no_leaked_tasks.__name__)
    yield _loop_error_contexts
    if _loop_error_contexts:
        messages = "; ".join(
            f"{ctx.get('message')!s} ({ctx.get('exception')!r})" for ctx in _loop_error_contexts
        )
        _loop_error_contexts.clear()
        pytest.fail(f"the event loop's exception handler was called: {messages}", pytrace=False)


@pytest.fixture
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fail an asyncio test that leaves a task running once every other fixture is torn down.

    Every task needs an owner that awaits it at shutdown (STYLE.md, async discipline); without
    this check the loop runner would cancel a leaked task silently. Set up first (by
    ``loop_errors``), torn down last, still on the test's loop.
    """
    yield
    current = asyncio.current_task()
    leaked = [task for task in asyncio.all_tasks() if task is not current]
    if not leaked:
        return
    for task in leaked:
        task.cancel()
    await asyncio.gather(*leaked, return_exceptions=True)
    names = ", ".join(sorted(repr(task.get_coro()) for task in leaked))
    pytest.fail(f"{len(leaked)} task(s) still running after teardown: {names}", pytrace=False)


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOOPBACK, 0))
        sock.listen(FIXTURE_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@pytest.fixture
def bound_socket_factory() -> Iterator[Callable[[], socket.socket]]:
    """Make listening, non-blocking sockets on 127.0.0.1 port 0; all closed after the test.

    A server that takes one over may close it earlier; closing twice is harmless.
    """
    socks: list[socket.socket] = []

    def make() -> socket.socket:
        sock = _listening_socket()
        socks.append(sock)
        return sock

    yield make
    for sock in socks:
        sock.close()


@pytest.fixture
def bound_socket(bound_socket_factory: Callable[[], socket.socket]) -> socket.socket:
    """One listening, non-blocking socket on 127.0.0.1 port 0. Nobody accepts on it unless a
    server is started on it: on its own, it is the backlog-only server (handshake, then nothing).
    """
    return bound_socket_factory()


@pytest.fixture
def refused_addr() -> Iterator[tuple[str, int]]:
    """A 127.0.0.1 address that refuses connections (RST), its port held for the whole test."""
    sock, addr = refused_address()
    try:
        yield addr
    finally:
        sock.close()


@pytest.fixture
async def echo_server(bound_socket: socket.socket) -> AsyncIterator[EchoServer]:
    async with EchoServer(bound_socket, name="echo") as server:
        yield server


@pytest.fixture
async def silent_server(bound_socket: socket.socket) -> AsyncIterator[SilentServer]:
    async with SilentServer(bound_socket, name="silent") as server:
        yield server


@pytest.fixture
async def garbage_server(bound_socket: socket.socket) -> AsyncIterator[GarbageServer]:
    async with GarbageServer(bound_socket, name="garbage") as server:
        yield server


@pytest.fixture
async def reset_server(bound_socket: socket.socket) -> AsyncIterator[ResetServer]:
    async with ResetServer(bound_socket, name="reset") as server:
        yield server


@pytest.fixture
async def truncating_server(bound_socket: socket.socket) -> AsyncIterator[TruncatingServer]:
    async with TruncatingServer(bound_socket, name="truncating") as server:
        yield server


@pytest.fixture
async def stale_server(bound_socket: socket.socket) -> AsyncIterator[StaleKeepAliveServer]:
    """Closes after each answer despite ``Connection: keep-alive`` (``StaleMode.AFTER_RESPONSE``);
    construct ``StaleKeepAliveServer`` yourself for the other mode."""
    async with StaleKeepAliveServer(bound_socket, name="stale") as server:
        yield server


@pytest.fixture
async def dribble_server(bound_socket: socket.socket) -> AsyncIterator[DribbleServer]:
    async with DribbleServer(bound_socket, name="dribble") as server:
        yield server


@pytest.fixture
async def tcp_echo_server(bound_socket: socket.socket) -> AsyncIterator[TcpEchoServer]:
    async with TcpEchoServer(bound_socket, name="tcp-echo") as server:
        yield server
