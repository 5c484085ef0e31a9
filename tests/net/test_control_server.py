"""The control socket server in-process: hostile input, many clients, framing, idle clients.

A proxy runtime is started with ``ProxyStarter`` (two echo upstreams behind ``app``), and a
``ControlServer`` is bound on it at a socket in ``tmp_path``, exactly as ``serve`` would bind it.
Clients are plain ``asyncio.open_unix_connection`` streams. Every test ends by proving that no
server's admin state, weight or pool changed, unless it changed them on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.net.proxy_harness import (
    WAIT_S,
    ProxyStarter,
    RunningProxy,
    eventually,
    proxy_config,
    server_entry,
)
from tests.servers import EchoServer, H11Client
from zdlb.balancer.server import AdminState
from zdlb.config.model import DEFAULT_WEIGHT
from zdlb.control import server as control_server
from zdlb.control.commands import Controller
from zdlb.control.protocol import (
    MAX_LINE_BYTES,
    USAGE,
    Flip,
    SetServerState,
    SetServerWeight,
    Swap,
    parse_command,
    wants_json,
)
from zdlb.control.server import ControlServer
from zdlb.errors import ControlUsageError

SOCKET_NAME = "ctl.sock"
FUZZ_SEED = 20240611
FUZZ_LINES = 200
CLIENTS = 50
# Short enough to keep the test quick, long enough that a loaded box still connects in time.
SHORT_IDLE_S = 0.2
# Words the mutation fuzzer splices into lines, so it reaches deep into the grammar.
VOCABULARY = (
    b"json",
    b"help",
    b"show",
    b"info",
    b"backends",
    b"servers",
    b"set",
    b"server",
    b"state",
    b"weight",
    b"wait",
    b"idle",
    b"flip",
    b"swap",
    b"force",
    b"app/s1",
    b"app/s2",
    b"app",
    b"nope/s1",
    b"ready",
    b"drain",
    b"maint",
    b"0",
    b"-1",
    b"257",
    b"0.01",
    b"1e999",
    b"nan",
    b"/",
)
SEEDS = (
    b"show info",
    b"show servers app",
    b"json show backends",
    b"help",
    b"wait app/s1 idle 0.01",
    b"set server app/s1 state maint",
    b"set server app/s2 weight 0",
)

State = list[tuple[str, AdminState, int, str]]


@dataclass
class Control:
    """A bound control server on a running proxy, and the path clients connect to."""

    proxy: RunningProxy
    server: ControlServer
    path: Path

    def state(self) -> State:
        """Every server's operator-visible state: name, admin, weight, pool."""
        return [
            (s.name, s.admin, s.weight, s.pool.value) for s in self.proxy.link().backend.servers
        ]

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with asyncio.timeout(WAIT_S):
            return await asyncio.open_unix_connection(str(self.path))


INITIAL: State = [
    ("s1", AdminState.READY, DEFAULT_WEIGHT, "main"),
    ("s2", AdminState.READY, DEFAULT_WEIGHT, "main"),
]


@pytest.fixture
async def control(
    bound_socket_factory: Callable[[], socket.socket], tmp_path: Path
) -> AsyncIterator[Control]:
    path = tmp_path / SOCKET_NAME
    async with (
        EchoServer(bound_socket_factory(), name="s1") as s1,
        EchoServer(bound_socket_factory(), name="s2") as s2,
        ProxyStarter() as starter,
    ):
        config = proxy_config([server_entry("s1", s1.addr), server_entry("s2", s2.addr)])
        proxy = await starter.start(config)
        runtime = proxy.runtime
        controller = Controller(runtime.backends, runtime.routes, runtime.health)
        server = ControlServer(path, None, controller)
        await server.start()
        try:
            yield Control(proxy, server, path)
        finally:
            await server.close()
    assert not path.exists()


async def read_answer(reader: asyncio.StreamReader) -> list[str]:
    """The lines of one framed answer, without the empty line that ends it.

    Fails if the answer starts with an empty line (a stray terminator) or the peer closes
    before the terminator.
    """
    lines: list[str] = []
    async with asyncio.timeout(WAIT_S):
        while True:
            raw = await reader.readline()
            assert raw.endswith(b"\n"), f"closed mid-answer after {lines!r} + {raw!r}"
            line = raw[:-1].decode("utf-8")
            if line == "":
                assert lines, "an answer with no body, or a second empty line"
                return lines
            lines.append(line)


async def ask(control: Control, line: bytes) -> list[str]:
    """Send one line on a fresh connection, read the answer, check nothing else follows."""
    reader, writer = await control.connect()
    try:
        writer.write(line)
        lines = await read_answer(reader)
        writer.write_eof()
        async with asyncio.timeout(WAIT_S):
            assert await reader.read() == b"", "bytes after the answer's empty line"
    finally:
        writer.close()
        await writer.wait_closed()
    return lines


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes (a reset counts as the end), within WAIT_S."""
    received = bytearray()
    async with asyncio.timeout(WAIT_S):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    return bytes(received)


async def close_dropped(writer: asyncio.StreamWriter) -> None:
    """Close a connection the server may have closed with our bytes unread (a reset here)."""
    writer.close()
    try:
        await writer.wait_closed()
    except (BrokenPipeError, ConnectionResetError):
        pass


def is_error(lines: list[str], as_json: bool) -> bool:
    if as_json:
        value = json.loads(lines[0])
        return isinstance(value, dict) and "error" in value
    return lines[0].startswith("error: ")


def mutate(rng: random.Random) -> bytes:
    """A seed command with bytes flipped, words spliced in or dropped, or pure random bytes."""
    kind = rng.randrange(4)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 120)))
    seed = rng.choice(SEEDS)
    words = seed.split(b" ")
    if kind == 1:
        flipped = bytearray(seed)
        for _ in range(rng.randrange(1, 4)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        return bytes(flipped)
    if kind == 2:
        words.insert(rng.randrange(len(words) + 1), rng.choice(VOCABULARY))
        return rng.choice((b" ", b"\t", b"  ")).join(words)
    del words[rng.randrange(len(words))]
    return b" ".join(words)


def fuzz_lines(count: int) -> list[bytes]:
    """``count`` lines, none of which would change a server (those are skipped, not sent)."""
    rng = random.Random(FUZZ_SEED)
    lines: list[bytes] = []
    while len(lines) < count:
        line = mutate(rng).replace(b"\n", b"")
        try:
            command, _ = parse_command(line)
        except ControlUsageError:
            pass
        else:
            if isinstance(command, SetServerState | SetServerWeight | Flip | Swap):
                continue  # a valid change: its effect is tested elsewhere
        lines.append(line + rng.choice((b"\n", b"\r\n")))
    return lines


# --- hostile input --------------------------------------------------------------------------------


async def test_fuzzed_lines_are_answered_and_change_nothing(control: Control) -> None:
    lines = fuzz_lines(FUZZ_LINES)
    reader, writer = await control.connect()
    errors = 0
    try:
        for line in lines:
            writer.write(line)
            answer = await read_answer(reader)
            try:
                parse_command(line)
            except ControlUsageError:
                # Answered in the format asked for, even when the rest of the line is garbage.
                assert is_error(answer, as_json=wants_json(line)), (line, answer)
                errors += 1
        writer.write_eof()
        assert await read_to_eof(reader) == b""
    finally:
        writer.close()
        await writer.wait_closed()

    assert errors > FUZZ_LINES // 2, "the fuzzer should mostly produce invalid commands"
    assert control.state() == INITIAL
    assert await ask(control, b"show info\n")  # still answering, on a new connection


async def test_fuzzed_lines_pipelined_get_one_answer_each(control: Control) -> None:
    lines = fuzz_lines(FUZZ_LINES)
    reader, writer = await control.connect()
    try:
        writer.write(b"".join(lines))  # all at once: the server must split them itself
        writer.write_eof()
        answers = [await read_answer(reader) for _ in lines]
        assert await read_to_eof(reader) == b""
    finally:
        writer.close()
        await writer.wait_closed()

    assert len(answers) == FUZZ_LINES
    assert control.state() == INITIAL


@pytest.mark.parametrize(
    "size",
    [MAX_LINE_BYTES + 3, 10_000, 1024 * 1024],
    ids=["limit+3", "10KB", "1MiB"],
)
async def test_oversized_line_is_answered_with_an_error_then_closed(
    control: Control, size: int
) -> None:
    # Starts like a state change: nothing of it may be acted upon.
    line = b"set server app/s1 state maint " + b"x" * size + b"\n"
    reader, writer = await control.connect()
    try:
        writer.write(line)  # not drained: the server stops reading, so it may never drain
        received = await read_to_eof(reader)
    finally:
        await close_dropped(writer)

    assert received == f"error: line longer than {MAX_LINE_BYTES} bytes\nusage: help\n\n".encode()
    assert control.state() == INITIAL
    assert (await ask(control, b"show info\n"))[0].startswith("info")


@pytest.mark.parametrize("extra", [1, 2], ids=["limit+1", "limit+2"])
async def test_line_just_over_the_limit_is_an_error(control: Control, extra: int) -> None:
    # Within the read bound (the limit plus "\r\n"), so the line is read whole and refused by
    # the parser; nothing of it runs.
    line = b"show info " + b"x" * (MAX_LINE_BYTES + extra - len(b"show info ")) + b"\n"

    answer = await ask(control, line)

    assert answer[0] == f"error: command longer than {MAX_LINE_BYTES} bytes", answer
    assert control.state() == INITIAL


async def test_line_at_the_limit_is_parsed(control: Control) -> None:
    padding = b" " * (MAX_LINE_BYTES - len(b"show info"))

    answer = await ask(control, b"show info" + padding + b"\r\n")

    assert answer[0].startswith("info"), answer


@pytest.mark.parametrize(
    "partial",
    [
        b"set server app/s1 state maint",
        b"set server app/s1 state maint\r",
        b"set server app/s2 weight 0",
        b"set server app/s1 state ma",
        b"json show inf",
        b"",
    ],
    ids=[
        "whole-set-no-newline",
        "set-cr-only",
        "weight-no-newline",
        "half-set",
        "half-show",
        "empty",
    ],
)
async def test_half_written_command_then_eof_does_nothing(control: Control, partial: bytes) -> None:
    reader, writer = await control.connect()
    try:
        writer.write(partial)
        writer.write_eof()
        assert await read_to_eof(reader) == b""
    finally:
        writer.close()
        await writer.wait_closed()

    assert control.state() == INITIAL
    assert not control.server._clients  # the connection was let go, not kept


async def test_eof_after_a_whole_command_answers_only_it(control: Control) -> None:
    reader, writer = await control.connect()
    try:
        writer.write(b"show info\nset server app/s1 state maint")
        writer.write_eof()
        answer = await read_answer(reader)
        assert await read_to_eof(reader) == b""
    finally:
        writer.close()
        await writer.wait_closed()

    assert answer[0].startswith("info"), answer
    assert control.state() == INITIAL


# --- many clients, idle clients -------------------------------------------------------------------


async def test_many_clients_at_once_all_get_answers(control: Control) -> None:
    async def one_client() -> list[str]:
        return await ask(control, b"show info\n")

    async with asyncio.TaskGroup() as tasks:
        pending = [tasks.create_task(one_client()) for _ in range(CLIENTS)]

    for task in pending:
        answer = task.result()
        assert answer[0].split() == ["info", "value"], answer
        assert any(line.split()[:1] == ["version"] for line in answer), answer
    assert control.state() == INITIAL


async def test_a_client_beyond_the_limit_takes_the_place_of_the_one_idle_longest(
    control: Control,
) -> None:
    """A full table (every client connected and quiet, as an abuser's would be) does not lock
    an operator out: the newcomer is served, and the client idle the longest is dropped."""
    opened = [await control.connect() for _ in range(control_server.MAX_CLIENTS)]
    try:
        # Each held connection has been accepted once it answers; then the table is full.
        for reader, writer in opened:
            writer.write(b"help\n")
            await read_answer(reader)
        for _ in range(3):  # operators keep getting in, each time one more quiet one leaves
            assert (await ask(control, b"show info\n"))[0].startswith("info")
        first_reader, first_writer = opened[0]
        assert await read_to_eof(first_reader) == b"", "the longest idle was not dropped"
        await close_dropped(first_writer)
        last_reader, last_writer = opened[-1]
        last_writer.write(b"show info\n")  # quiet for less long: still served
        assert (await read_answer(last_reader))[0].startswith("info")
    finally:
        for _, writer in opened[1:]:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    assert control.state() == INITIAL


@pytest.mark.parametrize("said", [b"", b"show in"], ids=["silent", "half-line"])
async def test_idle_client_is_dropped_after_the_idle_timeout(
    control: Control, monkeypatch: pytest.MonkeyPatch, said: bytes
) -> None:
    monkeypatch.setattr(control_server, "CLIENT_IDLE_S", SHORT_IDLE_S)
    loop = asyncio.get_running_loop()
    reader, writer = await control.connect()
    try:
        connected_at = loop.time()
        writer.write(said)
        assert await read_to_eof(reader) == b""
        waited_s = loop.time() - connected_at
    finally:
        writer.close()
        await writer.wait_closed()

    assert waited_s >= SHORT_IDLE_S * 0.9, waited_s
    assert (await ask(control, b"show info\n"))[0].startswith("info")


async def test_idle_timer_restarts_with_each_command(
    control: Control, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control_server, "CLIENT_IDLE_S", SHORT_IDLE_S)
    reader, writer = await control.connect()
    try:
        writer.write(b"show info\n")
        assert (await read_answer(reader))[0].startswith("info")
        writer.write(b"show backends\n")  # still within the idle time of the last answer
        assert (await read_answer(reader))[0].startswith("backend")
        assert await read_to_eof(reader) == b""
    finally:
        writer.close()
        await writer.wait_closed()


# --- framing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"help",
        b"json help",
        b"show info",
        b"json show info",
        b"show backends",
        b"json show backends",
        b"show servers",
        b"show servers app",
        b"json show servers",
        b"wait app/s1 idle 1",
        b"json wait app/s1 idle 1",
        b"frobnicate",
        b"json frobnicate",
        b"show servers nope",
        b"json show servers nope",
        b"json",
        b"   ",
        b"\xff\xfe",
    ],
)
async def test_every_answer_ends_with_exactly_one_empty_line(control: Control, line: bytes) -> None:
    reader, writer = await control.connect()
    try:
        for _ in range(2):  # the second answer proves the first left nothing behind
            writer.write(line + b"\n")
            answer = await read_answer(reader)
            assert all(text.strip() for text in answer), answer
        writer.write_eof()
        assert await read_to_eof(reader) == b""
    finally:
        writer.close()
        await writer.wait_closed()

    if line.startswith(b"json") and line.strip() != b"json":
        json.loads(answer[0])
        assert len(answer) == 1, answer
    assert control.state() == INITIAL


async def test_usage_error_lists_the_usage_lines(control: Control) -> None:
    answer = await ask(control, b"frobnicate\n")

    assert answer == ["error: unknown command 'frobnicate'", *USAGE]


async def test_set_commands_change_state_and_frame_their_answers(control: Control) -> None:
    assert await ask(control, b"set server app/s1 state drain\n") == [
        "app/s1: admin ready -> drain"
    ]
    assert await ask(control, b"json set server app/s2 weight 7\n") == [
        '{"server":"app/s2","weight":7}'
    ]

    assert control.state() == [
        ("s1", AdminState.DRAIN, DEFAULT_WEIGHT, "main"),
        ("s2", AdminState.READY, 7, "main"),
    ]


async def test_socket_is_removed_on_close(control: Control) -> None:
    assert control.path.exists()

    await control.server.close()

    assert not control.path.exists()
    with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
        await control.connect()


async def test_close_ends_a_client_stuck_in_a_long_wait(control: Control) -> None:
    # Two requests leave a pooled keep-alive connection to each (ready) server, so a `wait`
    # for s1 to be idle cannot end on its own.
    async with await H11Client.connect(control.proxy.addr) as client:
        for _ in range(2):
            assert (await client.request("GET", "/")).status == 200
    assert control.proxy.server("s1").conns > 0
    reader, writer = await control.connect()
    writer.write(b"wait app/s1 idle 3600\n")
    await writer.drain()
    await eventually(lambda: "busy=1" in repr(control.server))  # the wait is under way

    async with asyncio.timeout(WAIT_S):
        await control.server.close()
        answer = await reader.read()  # the waiting client is answered and let go at once
    assert answer == b"error: app/s1: the daemon is stopping\n\n"
    writer.close()
