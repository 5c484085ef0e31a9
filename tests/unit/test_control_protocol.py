"""Control protocol: every command form and every error, table-driven; replies and framing.

Lines are fed whole, with each terminator, with trailing garbage, and as random bytes
(Hypothesis), which must never raise anything but ``ControlUsageError``.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zdlb.balancer.server import AdminState
from zdlb.control.deploy_protocol import (
    DeployBegin,
    DeployEnd,
    DeployHost,
    DeployRenew,
    DeployStep,
    DeployTakeover,
)
from zdlb.control.protocol import (
    MAX_LINE_BYTES,
    MAX_WAIT_TIMEOUT_S,
    USAGE,
    Command,
    Flip,
    Help,
    Reload,
    SetServerState,
    SetServerWeight,
    ShowBackends,
    ShowDeploy,
    ShowInfo,
    ShowServers,
    ShowStatus,
    Swap,
    Upgrade,
    WaitIdle,
    WaitUp,
    format_command,
    frame,
    help_text,
    parse_command,
    render_error,
    render_json,
    render_json_error,
    render_table,
    wants_json,
)
from zdlb.deploy.plan import Step, Target
from zdlb.deploy.record import DeployStatus, HostStatus
from zdlb.errors import ControlUsageError

U_HELP, U_INFO, U_BACKENDS, U_SERVERS, U_STATE, U_WEIGHT, U_FLIP, U_SWAP, U_WAIT = USAGE[:9]
U_SHOW_DEPLOY, U_BEGIN, U_TAKEOVER, U_UPDATE = USAGE[9:13]
U_ALL = "\n".join(USAGE)
U_SHOW_STATUS = USAGE[15]
U_SHOW = "\n".join((U_INFO, U_BACKENDS, U_SERVERS, U_SHOW_DEPLOY, U_SHOW_STATUS))
U_SET = "\n".join((U_STATE, U_WEIGHT))

COMMANDS = [
    pytest.param(b"help", Help(), id="help"),
    pytest.param(b"show info", ShowInfo(), id="show-info"),
    pytest.param(b"show backends", ShowBackends(), id="show-backends"),
    pytest.param(b"show servers", ShowServers(None), id="show-servers-all"),
    pytest.param(b"show servers app", ShowServers("app"), id="show-servers-one"),
    pytest.param(b"show servers a.b_c-9", ShowServers("a.b_c-9"), id="name-every-char-class"),
    pytest.param(
        b"set server app/web-1 state ready",
        SetServerState("app", "web-1", AdminState.READY),
        id="set-state-ready",
    ),
    pytest.param(
        b"set server app/web-1 state drain",
        SetServerState("app", "web-1", AdminState.DRAIN),
        id="set-state-drain",
    ),
    pytest.param(
        b"set server app/web-1 state maint",
        SetServerState("app", "web-1", AdminState.MAINT),
        id="set-state-maint",
    ),
    pytest.param(b"set server a/b weight 0", SetServerWeight("a", "b", 0), id="weight-zero"),
    pytest.param(b"set server a/b weight 100", SetServerWeight("a", "b", 100), id="weight-100"),
    pytest.param(b"set server a/b weight 256", SetServerWeight("a", "b", 256), id="weight-max"),
    pytest.param(b"set server a/b weight 007", SetServerWeight("a", "b", 7), id="weight-zeros"),
    pytest.param(b"set server a/b weight +5", SetServerWeight("a", "b", 5), id="weight-plus"),
    pytest.param(b"wait a/b idle", WaitIdle("a", "b", 30.0), id="wait-default-timeout"),
    pytest.param(b"wait a/b idle 5", WaitIdle("a", "b", 5.0), id="wait-int-timeout"),
    pytest.param(b"wait a/b idle 0.25", WaitIdle("a", "b", 0.25), id="wait-fraction"),
    pytest.param(b"wait a/b idle .5", WaitIdle("a", "b", 0.5), id="wait-leading-dot"),
    pytest.param(b"wait a/b idle 3600", WaitIdle("a", "b", 3600.0), id="wait-max"),
    pytest.param(b"wait a/b idle 1e3", WaitIdle("a", "b", 1000.0), id="wait-exponent"),
    pytest.param(b"flip app/front-1", Flip("app", "front-1"), id="flip"),
    pytest.param(b"flip app/front-1 force", Flip("app", "front-1", True), id="flip-force"),
    pytest.param(b"flip app/front-1 wait 30", Flip("app", "front-1", wait_s=30.0), id="flip-wait"),
    pytest.param(b"wait a/b up", WaitUp("a", "b", 30.0), id="wait-up-default-timeout"),
    pytest.param(b"show deploy", ShowDeploy(), id="show-deploy"),
    pytest.param(b"show status", ShowStatus(), id="show-status"),
    pytest.param(
        b"deploy begin app to main pid 42", DeployBegin("app", Target.MAIN, 42), id="begin-all"
    ),
    pytest.param(
        b"deploy begin app to backup pid 7 front-1 front-2",
        DeployBegin("app", Target.BACKUP, 7, ("front-1", "front-2")),
        id="begin-named",
    ),
    pytest.param(b"deploy takeover pid 9", DeployTakeover(9), id="takeover"),
    pytest.param(b"deploy renew 0af3", DeployRenew("0af3"), id="renew"),
    pytest.param(
        b"deploy step 0af3 front-1 wait-up", DeployStep("0af3", "front-1", Step.WAIT_UP), id="step"
    ),
    pytest.param(
        b"deploy host 0af3 front-1 failed wait-up: timeout (health=down)",
        DeployHost("0af3", "front-1", HostStatus.FAILED, "wait-up: timeout (health=down)"),
        id="host-failed",
    ),
    pytest.param(b"deploy end 0af3 done", DeployEnd("0af3", DeployStatus.DONE), id="end-done"),
    pytest.param(b"wait a/b up 2.5", WaitUp("a", "b", 2.5), id="wait-up-timeout"),
    pytest.param(b"swap app", Swap("app"), id="swap"),
    pytest.param(b"reload", Reload(), id="reload"),
    pytest.param(b"upgrade", Upgrade(), id="upgrade"),
]


@pytest.mark.parametrize(("line", "command"), COMMANDS)
@pytest.mark.parametrize("ending", [b"", b"\n", b"\r\n"], ids=["bare", "lf", "crlf"])
def test_every_command_form(line: bytes, command: Command, ending: bytes) -> None:
    assert parse_command(line + ending) == (command, False)


@pytest.mark.parametrize(("line", "command"), COMMANDS)
def test_json_prefix(line: bytes, command: Command) -> None:
    assert parse_command(b"json " + line) == (command, True)
    assert wants_json(b"json " + line)
    assert not wants_json(line)


@pytest.mark.parametrize(("line", "command"), COMMANDS)
def test_format_command_reads_back(line: bytes, command: Command) -> None:
    assert parse_command(format_command(command).encode()) == (command, False)


WHITESPACE = [
    pytest.param(b"show  info", id="double-space"),
    pytest.param(b"show\tinfo", id="tab"),
    pytest.param(b"show \t \tinfo", id="mixed-run"),
    pytest.param(b"  show info", id="leading-blanks"),
    pytest.param(b"show info \t ", id="trailing-blanks"),
    pytest.param(b"\tshow info\t\r\n", id="tabs-around-crlf"),
]


@pytest.mark.parametrize("line", WHITESPACE)
def test_whitespace_variants(line: bytes) -> None:
    assert parse_command(line) == (ShowInfo(), False)
    assert parse_command(b" json\t" + line) == (ShowInfo(), True)


LONG = "x" * 100
LONG_SHOWN = "x" * 37 + "..."

ERRORS = [
    # line, message, usage
    pytest.param(b"", "empty command", U_ALL, id="empty"),
    pytest.param(b"\n", "empty command", U_ALL, id="empty-lf"),
    pytest.param(b"\r\n", "empty command", U_ALL, id="empty-crlf"),
    pytest.param(b" \t ", "empty command", U_ALL, id="blanks-only"),
    pytest.param(b"json", "missing command after 'json'", U_ALL, id="json-alone"),
    pytest.param(b"json json help", "unknown command 'json'", U_ALL, id="json-twice"),
    pytest.param(b"frobnicate", "unknown command 'frobnicate'", U_ALL, id="unknown-word"),
    pytest.param(b"HELP", "unknown command 'HELP'", U_ALL, id="keywords-case-sensitive"),
    pytest.param(b"Show info", "unknown command 'Show'", U_ALL, id="show-capitalised"),
    pytest.param(LONG.encode(), f"unknown command '{LONG_SHOWN}'", U_ALL, id="long-word-clipped"),
    pytest.param(b"help me", "unexpected 'me' after 'help'", U_HELP, id="help-extra"),
    # show
    pytest.param(b"show", "missing what to show", U_SHOW, id="show-alone"),
    pytest.param(b"show stat", "unknown command 'show stat'", U_SHOW, id="show-unknown"),
    pytest.param(b"show info x", "unexpected 'x' after 'show info'", U_INFO, id="info-extra"),
    pytest.param(
        b"show backends x", "unexpected 'x' after 'show backends'", U_BACKENDS, id="backends-extra"
    ),
    pytest.param(
        b"show servers a b", "unexpected 'b' after 'show servers a'", U_SERVERS, id="servers-extra"
    ),
    pytest.param(
        b"show servers a/b",
        "invalid backend name 'a/b': use letters, digits, '.', '_', '-'",
        U_SERVERS,
        id="servers-bad-name",
    ),
    # set server: target
    pytest.param(b"set", "missing what to set", U_SET, id="set-alone"),
    pytest.param(b"set weight a/b 1", "unknown command 'set weight'", U_SET, id="set-unknown"),
    pytest.param(b"set server", "missing BACKEND/SERVER", U_SET, id="set-no-target"),
    pytest.param(b"set server ab", "expected BACKEND/SERVER, got 'ab'", U_SET, id="no-slash"),
    pytest.param(b"set server /b state ready", "empty backend name", U_SET, id="empty-backend"),
    pytest.param(b"set server a/ state ready", "empty server name", U_SET, id="empty-server"),
    pytest.param(
        b"set server a/b/c state ready",
        "invalid server name 'b/c': use letters, digits, '.', '_', '-'",
        U_SET,
        id="two-slashes",
    ),
    pytest.param(
        b"set server a:1/b state ready",
        "invalid backend name 'a:1': use letters, digits, '.', '_', '-'",
        U_SET,
        id="bad-backend-char",
    ),
    pytest.param(
        "set server a/caf\u00e9 state ready".encode(),
        "invalid server name 'caf\u00e9': use letters, digits, '.', '_', '-'",
        U_SET,
        id="non-ascii-name",
    ),
    pytest.param(b"set server a/b", "missing 'state' or 'weight'", U_SET, id="no-field"),
    pytest.param(
        b"set server a/b status up",
        "unknown field 'status': expected 'state' or 'weight'",
        U_SET,
        id="unknown-field",
    ),
    # set server: state
    pytest.param(
        b"set server a/b state",
        "missing state: expected ready, drain, maint",
        U_STATE,
        id="state-missing",
    ),
    pytest.param(
        b"set server a/b state up",
        "unknown state 'up': expected ready, drain, maint",
        U_STATE,
        id="state-unknown",
    ),
    pytest.param(
        b"set server a/b state DRAIN",
        "unknown state 'DRAIN': expected ready, drain, maint",
        U_STATE,
        id="state-case-sensitive",
    ),
    pytest.param(
        b"set server a/b state drain now",
        "unexpected 'now' after 'set server a/b state drain'",
        U_STATE,
        id="state-extra",
    ),
    # set server: weight
    pytest.param(b"set server a/b weight", "missing weight", U_WEIGHT, id="weight-missing"),
    pytest.param(
        b"set server a/b weight 257", "weight 257 is out of range 0..256", U_WEIGHT, id="w-257"
    ),
    pytest.param(
        b"set server a/b weight -1", "weight -1 is out of range 0..256", U_WEIGHT, id="w-negative"
    ),
    pytest.param(
        b"set server a/b weight 99999999999",
        "weight 99999999999 is out of range 0..256",
        U_WEIGHT,
        id="w-huge",
    ),
    pytest.param(
        b"set server a/b weight 1.5", "weight '1.5' is not an integer", U_WEIGHT, id="w-float"
    ),
    pytest.param(
        b"set server a/b weight ten", "weight 'ten' is not an integer", U_WEIGHT, id="w-word"
    ),
    pytest.param(
        b"set server a/b weight 1_0", "weight '1_0' is not an integer", U_WEIGHT, id="w-underscore"
    ),
    pytest.param(
        "set server a/b weight \u0661".encode(),
        "weight '\u0661' is not an integer",
        U_WEIGHT,
        id="w-arabic-digit",
    ),
    pytest.param(
        b"set server a/b weight 5 6",
        "unexpected '6' after 'set server a/b weight 5'",
        U_WEIGHT,
        id="w-extra",
    ),
    # wait
    pytest.param(b"flip", "missing BACKEND/SERVER", U_FLIP, id="flip-alone"),
    pytest.param(b"flip app", "expected BACKEND/SERVER, got 'app'", U_FLIP, id="flip-no-slash"),
    pytest.param(
        b"flip a/b now",
        "unknown option 'now': expected 'force' or 'wait'",
        U_FLIP,
        id="flip-unknown-option",
    ),
    pytest.param(b"flip a/b wait", "missing TIMEOUT_S after 'wait'", U_FLIP, id="flip-wait-alone"),
    pytest.param(
        b"flip a/b wait 0", "timeout 0 must be > 0 and <= 3600 seconds", U_FLIP, id="flip-wait-0"
    ),
    pytest.param(
        b"flip a/b wait 5 force", "unexpected 'force' after 'flip a/b wait 5'", U_FLIP, id="flip-wf"
    ),
    pytest.param(
        b"flip a/b force x", "unexpected 'x' after 'flip a/b force'", U_FLIP, id="flip-extra"
    ),
    pytest.param(b"swap", "missing BACKEND", U_SWAP, id="swap-alone"),
    pytest.param(b"swap a b", "unexpected 'b' after 'swap a'", U_SWAP, id="swap-extra"),
    pytest.param(
        b"swap a/b",
        "invalid backend name 'a/b': use letters, digits, '.', '_', '-'",
        U_SWAP,
        id="swap-target",
    ),
    pytest.param(b"show deploy x", "unexpected 'x' after 'show deploy'", U_SHOW_DEPLOY, id="sd-x"),
    pytest.param(b"show status x", "unexpected 'x' after 'show status'", U_SHOW_STATUS, id="ss-x"),
    pytest.param(
        b"deploy", "missing what to do", "\n".join((U_BEGIN, U_TAKEOVER, U_UPDATE)), id="deploy"
    ),
    pytest.param(
        b"deploy begin app to side pid 1",
        "unknown pool 'side': expected main, backup",
        U_BEGIN,
        id="begin-bad-pool",
    ),
    pytest.param(
        b"deploy begin app to main pid 0", "pid '0' is not a positive integer", U_BEGIN, id="pid0"
    ),
    pytest.param(b"deploy begin app main", "expected 'to', got 'main'", U_BEGIN, id="begin-no-to"),
    pytest.param(
        b"deploy renew XYZ", "token 'XYZ' is not 1..64 hex digits", U_UPDATE, id="bad-token"
    ),
    pytest.param(
        b"deploy step ab s1 dance",
        "unknown step 'dance': expected check, flip, wait-idle, run, wait-up, verify, "
        "flip-back, confirm",
        U_UPDATE,
        id="bad-step",
    ),
    pytest.param(
        b"deploy end ab running",
        "unknown result 'running': expected done, failed, interrupted, rolled-back",
        U_UPDATE,
        id="end-running",
    ),
    pytest.param(b"wait", "missing BACKEND/SERVER", U_WAIT, id="wait-alone"),
    pytest.param(b"wait ab idle", "expected BACKEND/SERVER, got 'ab'", U_WAIT, id="wait-no-slash"),
    pytest.param(
        b"wait a/b", "missing condition: expected 'idle' or 'up'", U_WAIT, id="wait-no-idle"
    ),
    pytest.param(
        b"wait a/b empty",
        "unknown condition 'empty': expected 'idle' or 'up'",
        U_WAIT,
        id="wait-unknown",
    ),
    pytest.param(
        b"wait a/b up 7 8", "unexpected '8' after 'wait a/b up 7'", U_WAIT, id="wait-up-extra"
    ),
    pytest.param(
        b"wait a/b idle 0", "timeout 0 must be > 0 and <= 3600 seconds", U_WAIT, id="timeout-zero"
    ),
    pytest.param(
        b"wait a/b idle -1", "timeout -1 must be > 0 and <= 3600 seconds", U_WAIT, id="timeout-neg"
    ),
    pytest.param(
        b"wait a/b idle 3600.5",
        "timeout 3600.5 must be > 0 and <= 3600 seconds",
        U_WAIT,
        id="timeout-over-max",
    ),
    pytest.param(
        b"wait a/b idle 1e999",
        "timeout 1e999 must be > 0 and <= 3600 seconds",
        U_WAIT,
        id="timeout-overflows-to-inf",
    ),
    pytest.param(
        b"wait a/b idle nan", "timeout 'nan' is not a number of seconds", U_WAIT, id="timeout-nan"
    ),
    pytest.param(
        b"wait a/b idle inf", "timeout 'inf' is not a number of seconds", U_WAIT, id="timeout-inf"
    ),
    pytest.param(
        b"wait a/b idle 5s", "timeout '5s' is not a number of seconds", U_WAIT, id="timeout-unit"
    ),
    pytest.param(
        b"wait a/b idle 5 6", "unexpected '6' after 'wait a/b idle 5'", U_WAIT, id="wait-extra"
    ),
    # the line as a whole
    pytest.param(
        b"help " + b" " * MAX_LINE_BYTES,
        f"command longer than {MAX_LINE_BYTES} bytes",
        U_ALL,
        id="overlong",
    ),
    pytest.param(
        b"show info\xff",
        "command is not valid UTF-8 (bad byte at offset 9)",
        U_ALL,
        id="invalid-utf8",
    ),
    pytest.param(
        b"show servers \xc3",
        "command is not valid UTF-8 (bad byte at offset 13)",
        U_ALL,
        id="truncated-utf8",
    ),
    pytest.param(
        b"\xed\xa0\x80", "command is not valid UTF-8 (bad byte at offset 0)", U_ALL, id="surrogate"
    ),
    pytest.param(b"help\x00", "control character U+0000 at offset 4", U_ALL, id="nul"),
    pytest.param(b"show\rinfo", "control character U+000D at offset 4", U_ALL, id="bare-cr"),
    pytest.param(b"help\n\n", "control character U+000A at offset 4", U_ALL, id="two-lf"),
    pytest.param(b"help\r\n\r\n", "control character U+000D at offset 4", U_ALL, id="two-crlf"),
    pytest.param(b"help\nhelp", "control character U+000A at offset 4", U_ALL, id="embedded-lf"),
    pytest.param(b"\x1b[2Jhelp", "control character U+001B at offset 0", U_ALL, id="escape"),
    pytest.param(b"help\x7f", "control character U+007F at offset 4", U_ALL, id="del"),
    pytest.param(b"help\x0b", "control character U+000B at offset 4", U_ALL, id="vertical-tab"),
    pytest.param(
        "help\u0085".encode(), "control character U+0085 at offset 4", U_ALL, id="c1-next-line"
    ),
]


@pytest.mark.parametrize(("line", "message", "usage"), ERRORS)
def test_errors(line: bytes, message: str, usage: str) -> None:
    with pytest.raises(ControlUsageError) as caught:
        parse_command(line)
    assert str(caught.value) == message
    assert caught.value.usage == usage


@pytest.mark.parametrize(("line", "message", "usage"), ERRORS)
def test_errors_same_usage_under_json(line: bytes, message: str, usage: str) -> None:
    with pytest.raises(ControlUsageError) as caught:
        parse_command(b"json " + line)
    assert caught.value.usage == usage
    assert wants_json(b"json " + line)


def test_line_length_bound_is_on_the_command_not_the_terminator() -> None:
    line = b"help" + b" " * (MAX_LINE_BYTES - 4)
    assert parse_command(line + b"\r\n") == (Help(), False)
    with pytest.raises(ControlUsageError, match="longer than"):
        parse_command(line + b" ")


def test_every_error_usage_is_made_of_usage_lines() -> None:
    for param in ERRORS:
        usage = param.values[2]
        assert isinstance(usage, str)
        assert all(line in USAGE for line in usage.split("\n"))


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_usage_errors(line: bytes) -> None:
    try:
        parse_command(line)
    except ControlUsageError as exc:
        assert str(exc)
        assert exc.usage
    assert isinstance(wants_json(line), bool)


WORDS = st.sampled_from(
    "json help show info backends servers set server state ready drain maint weight wait idle"
    " up flip force a/b a 0 256 30 -1 x/".split()
)


@given(st.lists(WORDS, max_size=7), st.sampled_from([" ", "\t", "  "]))
def test_random_keyword_soup_raises_only_usage_errors(words: list[str], blank: str) -> None:
    try:
        command, as_json = parse_command(blank.join(words).encode())
    except ControlUsageError as exc:
        assert exc.usage
    else:
        assert as_json == (words[0] == "json")
        assert parse_command(format_command(command).encode()) == (command, False)


NAMES = st.text(
    st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"),
    min_size=1,
    max_size=20,
)


@given(
    st.one_of(
        st.builds(ShowServers, st.none() | NAMES),
        st.builds(SetServerState, NAMES, NAMES, st.sampled_from(AdminState)),
        st.builds(SetServerWeight, NAMES, NAMES, st.integers(0, 256)),
        st.builds(
            WaitIdle,
            NAMES,
            NAMES,
            st.floats(min_value=0, max_value=MAX_WAIT_TIMEOUT_S, exclude_min=True),
        ),
        st.builds(
            WaitUp,
            NAMES,
            NAMES,
            st.floats(min_value=0, max_value=MAX_WAIT_TIMEOUT_S, exclude_min=True),
        ),
        st.builds(DeployBegin, NAMES, st.sampled_from(Target), st.integers(1, 10**6)),
        st.builds(DeployStep, st.sampled_from(["0", "ab12"]), NAMES, st.sampled_from(Step)),
        st.builds(
            DeployEnd,
            st.sampled_from(["0", "ab12"]),
            st.sampled_from([r for r in DeployStatus if r is not DeployStatus.RUNNING]),
        ),
        st.builds(
            Flip,
            NAMES,
            NAMES,
            st.just(False),
            st.floats(min_value=0, max_value=MAX_WAIT_TIMEOUT_S, exclude_min=True),
        ),
    )
)
def test_format_then_parse_round_trips(command: Command) -> None:
    assert parse_command(format_command(command).encode() + b"\n") == (command, False)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param(b"json help", True, id="json-space"),
        pytest.param(b"  json\thelp", True, id="json-after-blanks"),
        pytest.param(b"json", True, id="json-alone"),
        pytest.param(b"json\r\n", True, id="json-crlf"),
        pytest.param(b"jsonx help", False, id="json-prefix-of-word"),
        pytest.param(b"help json", False, id="json-not-first"),
        pytest.param(b"JSON help", False, id="json-case-sensitive"),
        pytest.param(b"", False, id="empty"),
    ],
)
def test_wants_json(line: bytes, expected: bool) -> None:
    assert wants_json(line) is expected


# --- replies -------------------------------------------------------------------------------------


def test_usage_lines_one_per_command_form() -> None:
    assert USAGE == (
        "usage: help",
        "usage: show info",
        "usage: show backends",
        "usage: show servers [BACKEND] [--fleet]",
        "usage: set server BACKEND/SERVER state ready|drain|maint",
        "usage: set server BACKEND/SERVER weight 0..256",
        "usage: flip BACKEND/SERVER [force | wait TIMEOUT_S]",
        "usage: swap BACKEND",
        "usage: wait BACKEND/SERVER idle|up [TIMEOUT_S]",
        "usage: show deploy",
        "usage: deploy begin BACKEND to main|backup pid PID [SERVER...]",
        "usage: deploy takeover pid PID",
        "usage: deploy renew|step|host|end TOKEN ...",
        "usage: reload",
        "usage: upgrade",
        "usage: show status",
    )


def test_help_text_lists_every_command_without_blank_lines() -> None:
    text = help_text()
    assert text.endswith("\n")
    assert "\n\n" not in text
    for usage in USAGE:
        assert usage.removeprefix("usage: ") in text
    assert frame(text) == (text + "\n").encode()


def test_render_table_aligns_left_two_spaces_apart() -> None:
    text = render_table(
        ("backend", "server", "admin", "weight", "note"),
        [
            ("app", "web-1", AdminState.READY, 100, None),
            ("application", "w2", AdminState.DRAIN, 7, ""),
        ],
    )
    assert text == (
        "backend      server  admin  weight  note\n"
        "app          web-1   ready  100     -\n"
        "application  w2      drain  7\n"
    )


def test_render_table_without_rows_is_the_header() -> None:
    assert render_table(("a", "bb"), []) == "a  bb\n"


CELLS = st.text(st.characters(codec="ascii", categories=["L", "N"]), max_size=8)


@given(st.lists(st.lists(CELLS, min_size=3, max_size=3), max_size=6))
def test_render_table_columns_start_at_the_same_offset(rows: list[list[str]]) -> None:
    headers = ["one", "two", "three"]
    table = [headers, *rows]
    lines = render_table(headers, rows).split("\n")
    assert lines.pop() == ""
    assert len(lines) == len(table)
    widths = [max(len(line[column]) for line in table) for column in range(3)]
    starts = [0, widths[0] + 2, widths[0] + 2 + widths[1] + 2]
    for line, cells in zip(lines, table, strict=True):
        assert line == line.rstrip(" ")
        for start, width, cell in zip(starts, widths, cells, strict=True):
            assert line[start : start + width].rstrip(" ") == cell
            assert line[start + width : start + width + 2].strip(" ") == ""


def test_render_table_refuses_ragged_rows() -> None:
    with pytest.raises(ValueError, match="row has 1 cells, headers have 2"):
        render_table(("a", "b"), [("x",)])


def test_render_json_is_compact_sorted_and_ends_with_newline() -> None:
    text = render_json({"b": [1, None], "a": {"z": AdminState.MAINT, "y": "\u00e9\n"}})
    assert text == '{"a":{"y":"\\u00e9\\n","z":"maint"},"b":[1,null]}\n'
    assert text.count("\n") == 1


def test_render_json_refuses_nan_and_unknown_types() -> None:
    with pytest.raises(ValueError, match="JSON"):
        render_json({"x": float("nan")})
    with pytest.raises(TypeError, match="not JSON serializable: object"):
        render_json({"x": object()})


def test_render_error_text() -> None:
    assert render_error("missing weight", U_WEIGHT) == (
        "error: missing weight\nusage: set server BACKEND/SERVER weight 0..256\n"
    )
    assert render_error("no such server 'a/b'", "") == "error: no such server 'a/b'\n"


def test_render_json_error() -> None:
    text = render_json_error("missing weight", U_WEIGHT)
    assert json.loads(text) == {"error": "missing weight", "usage": U_WEIGHT}
    assert text.count("\n") == 1


FRAMES = [
    pytest.param("ok", b"ok\n\n", id="adds-newline-and-terminator"),
    pytest.param("ok\n", b"ok\n\n", id="adds-terminator"),
    pytest.param("ok\n\n", b"ok\n\n", id="already-framed"),
    pytest.param("ok\n\n\n\n", b"ok\n\n", id="extra-blank-lines"),
    pytest.param("a\n\nb\n", b"a\nb\n\n", id="inner-blank-line-dropped"),
    pytest.param("a\n \t\nb", b"a\nb\n\n", id="inner-blank-with-spaces-dropped"),
    pytest.param("a\r\n\r\nb", b"a\r\nb\n\n", id="inner-crlf-blank-dropped"),
    pytest.param("caf\u00e9\n", "caf\u00e9\n\n".encode(), id="utf8"),
    pytest.param("bad \ud800\n", b"bad ?\n\n", id="lone-surrogate-replaced"),
    pytest.param("", b"\n", id="empty-is-terminator-alone"),
    pytest.param("\n\n", b"\n", id="blank-is-terminator-alone"),
]


@pytest.mark.parametrize(("text", "framed"), FRAMES)
def test_frame(text: str, framed: bytes) -> None:
    assert frame(text) == framed


@given(st.text())
def test_frame_ends_with_exactly_one_empty_line(text: str) -> None:
    framed = frame(text)
    lines = framed.split(b"\n")
    assert lines[-1] == b""  # ends with a newline
    assert lines[:-1].count(b"") == 1
    assert lines[-2] == b""  # the one empty line is the last
    if text.strip():
        assert framed.endswith(b"\n\n")
        assert framed.count(b"\n\n") == 1


@given(st.text())
def test_frame_is_idempotent(text: str) -> None:
    once = frame(text).decode()
    assert frame(once) == once.encode()
