"""Request smuggling: zdlb's RequestReader against h11, the oracle, and a corpus of classic probes.

The property (``check_against_h11``), for one input fed to both parsers, about the *first*
request in it (the bytes after it are the next request, parsed from the same offset by both
whenever they agree where the first one ends, so the first one is all that needs proving):

1. zdlb may always refuse, or wait for more bytes, before it emits a head: refusing more than
   h11 is fine. Everything below is about inputs whose head zdlb *accepted* (emitted to the
   sink, which is when the proxy starts forwarding it).
2. A head zdlb accepts, h11 must accept too, with the same method and target. The only
   exceptions are listed in ``NORMALISATIONS``: leniencies the RFCs allow a recipient, which
   vanish because zdlb writes the request line and the framing field anew. For those, h11 is
   re-run on the input with that leniency rewritten the way zdlb forwards it, and that run must
   then satisfy the whole property; so no input is skipped, only judged on what the server sees.
3. If zdlb completes the request, h11 must complete it too with the same body length; if zdlb
   waits for more body, h11 must not have completed it (and must have seen as many body bytes,
   unless it refused the body); zdlb refusing mid-body is always fine (the proxy then closes
   both connections). Together: zdlb never ends a request at an offset h11 would not.

h11 is more lenient than llhttp in places (repeated equal Content-Lengths, Content-Length with
Transfer-Encoding, obs-fold, bare LF, control bytes in values, unknown methods): those inputs
are refused by zdlb and so fall under rule 1.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zdlb.config.model import Limits
from zdlb.errors import DownstreamProtocolError
from zdlb.http.head import Framing, Headers, RequestHead
from zdlb.http.stream import RequestReader

LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one parser made of the first request of an input."""

    head: tuple[bytes, bytes] | None  # (method, target) once the head was accepted
    body_len: int  # body bytes emitted so far
    is_complete: bool  # the request ended
    refused: bool  # the parser refused the input before the request ended


class ListSink:
    def __init__(self) -> None:
        self.head: RequestHead | None = None
        self.body_len = 0
        self.is_complete = False

    def request_head(self, head: RequestHead) -> None:
        if self.head is None:
            self.head = head
            if head.framing is Framing.NONE:  # the whole request: the reader sends no end
                self.is_complete = True

    def request_body(self, data: bytes) -> None:
        if not self.is_complete:
            self.body_len += len(data)

    def request_end(self, trailers: Headers) -> None:
        self.is_complete = True


def zdlb_outcome(data: bytes, *, bytewise: bool = False) -> Outcome:
    sink = ListSink()
    reader = RequestReader(sink, LIMITS)
    refused = False
    try:
        feed(reader, data, bytewise)
    except DownstreamProtocolError:
        refused = not sink.is_complete  # an error in a *following* request is not about this one
    head = (sink.head.method, sink.head.target) if sink.head is not None else None
    return Outcome(head, sink.body_len, sink.is_complete, refused)


def h11_outcome(data: bytes) -> Outcome:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    head: tuple[bytes, bytes] | None = None
    body_len = 0
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Request):
                head = (bytes(event.method), bytes(event.target))
            elif isinstance(event, h11.Data):
                body_len += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return Outcome(head, body_len, True, False)
            elif event is h11.NEED_DATA or event is h11.PAUSED:
                return Outcome(head, body_len, False, False)
            else:
                raise AssertionError(f"unexpected h11 event {event!r}")
    except h11.RemoteProtocolError:
        return Outcome(head, body_len, False, True)


# --- where zdlb may accept what h11 refuses: each one a rewrite zdlb's forwarding performs ------

_HEAD_END = re.compile(rb"\r?\n\r?\n")


def _in_head(data: bytes, edit: Callable[[bytes], bytes]) -> bytes:
    match = _HEAD_END.search(data)
    cut = match.start() if match else len(data)
    return edit(data[:cut]) + data[cut:]


def _strip_leading_empty_lines(data: bytes) -> bytes:
    # RFC 9112 section 2.2: "a server ... SHOULD ignore at least one empty line (CRLF) received
    # prior to the request-line". llhttp does; h11 refuses. Nothing of them is forwarded.
    return data.lstrip(b"\r\n")


def _single_spaces_in_request_line(data: bytes) -> bytes:
    # RFC 9112 section 3: recipients MAY parse the request-line on whitespace-delimited word
    # boundaries. llhttp takes runs of SP; h11 wants exactly one. zdlb writes the line anew
    # (rewrite.build_request_head) with single spaces, so the server never sees the run.
    line, sep, rest = data.partition(b"\n")
    return re.sub(rb" +", b" ", line) + sep + rest


def _no_empty_transfer_codings(data: bytes) -> bytes:
    # RFC 9110 section 5.6.1: a recipient MUST accept empty list elements (", chunked").
    # h11 compares the whole value with "chunked". zdlb replaces the field with its own
    # "Transfer-Encoding: chunked" line, so the server never sees the empty element.
    def clean(head: bytes) -> bytes:
        def fix(match: re.Match[bytes]) -> bytes:
            codings = [c.strip() for c in match.group(2).split(b",") if c.strip()]
            return match.group(1) + b", ".join(codings)

        return re.sub(rb"(?im)^(transfer-encoding:[ \t]*)([^\r\n]*?)(?=[ \t]*\r?$)", fix, head)

    return _in_head(data, clean)


NORMALISATIONS: list[Callable[[bytes], bytes]] = [
    _strip_leading_empty_lines,
    _single_spaces_in_request_line,
    _no_empty_transfer_codings,
]


OutcomeOf = Callable[[bytes, bool], Outcome]


def _zdlb(data: bytes, bytewise: bool) -> Outcome:
    return zdlb_outcome(data, bytewise=bytewise)


def check_against_h11(data: bytes, outcome_of: OutcomeOf = _zdlb) -> str:
    """Assert the property of the module docstring for ``data``; return a category for stats.

    ``outcome_of`` is zdlb's reader; a test swaps in a wrong one to prove the check can fail.
    """
    ours = outcome_of(data, False)
    assert outcome_of(data, True) == ours, "feeding byte by byte changed the outcome"
    if ours.head is None:
        return "zdlb-refused" if ours.refused else "zdlb-needs-data"
    oracle = h11_outcome(data)
    category = "both-accept"
    if oracle.head != ours.head or (ours.is_complete and not oracle.is_complete):
        normalised = data
        for normalise in NORMALISATIONS:
            normalised = normalise(normalised)
        oracle = h11_outcome(normalised)
        category = "accepted-after-normalising"
    assert oracle.head == ours.head, (ours, oracle)
    if ours.is_complete:
        assert oracle.is_complete and oracle.body_len == ours.body_len, (ours, oracle)
        return category
    if ours.refused:
        return "zdlb-refused-body"
    assert not oracle.is_complete, (ours, oracle)  # zdlb would eat the next request as body
    if not oracle.refused:
        assert oracle.body_len == ours.body_len, (ours, oracle)
    return "zdlb-wants-more-body"


# --- the grammar ------------------------------------------------------------------------------

# Each choice has common values and odd ones (obfuscations, forbidden bytes, bad syntax). Every
# example draws a noise level, the chance that any one choice is odd: with several dozen choices
# per request, a fixed chance would leave almost no request that both parsers accept.
NOISE_LEVELS = [0.0, 0.0, 0.02, 0.05, 0.15, 0.4]

METHODS = [b"GET", b"POST", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH"]
ODD_METHODS = [b"get", b"FOO", b"CONNECT", b"G ET", b"GET\x00", b""]
TARGETS = [b"/", b"/a?b=c", b"*", b"http://h/p", b"/%2F"]
ODD_TARGETS = [b"/a b", b"/\xff", b"", b"/\x00", b"/\t"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]
ODD_VERSIONS = [b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9", b"http/1.1", b"HTTP/1.1 ", b"HTTP/1"]
SPACES = [b" "]
ODD_SPACES = [b"  ", b"\t", b"", b" \t"]
EOLS = [b"\r\n"]
ODD_EOLS = [b"\n", b"\r", b"\r\r\n", b"\n\r", b" \r\n"]
SEPARATORS = [b": ", b":", b":\t", b":  "]
ODD_SEPARATORS = [b" : ", b" :", b"\t:", b"\r\n:", b"\x00:"]
LEADING = [b""]
ODD_LEADING = [b"\r\n", b"\n", b"\r\n\r\n", b" "]

TE_NAMES = [b"Transfer-Encoding", b"transfer-encoding", b"TRANSFER-ENCODING", b"Transfer-encoding"]
ODD_TE_NAMES = [
    b"Transfer_Encoding",
    b" Transfer-Encoding",
    b"Transfer-Encoding\x00",
    b"XTransfer-Encoding",
    b"Transfer-Encoding ",
]
TE_VALUES = [b"chunked", b"Chunked", b"CHUNKED", b"chunked ", b" chunked", b"\tchunked"]
ODD_TE_VALUES = [
    b"chunked, identity",
    b"identity, chunked",
    b"gzip, chunked",
    b"chunked, chunked",
    b"chunked,",
    b",chunked",
    b", chunked",
    b"x-chunked",
    b"xchunked",
    b"chunk",
    b"chunked;q=1",
    b"identity",
    b"",
    b'"chunked"',
    b"chunked\x00",
    b"\x0bchunked",
    b"chunked\x0b",
    b"chunked\xff",
    b"ch unked",
    b"chunked\r",
]
CL_NAMES = [b"Content-Length", b"content-length", b"CONTENT-LENGTH"]
ODD_CL_NAMES = [b"Content_Length", b"Content-Length\t", b" Content-Length", b"Content-Lengthx"]
HOST_NAMES = [b"Host", b"host", b"HOST"]
ODD_HOST_NAMES = [b"Host ", b"Hos", b"Host\x00"]
HOST_VALUES = [b"example.com", b"a:80", b"[::1]:8080", b""]
ODD_HOST_VALUES = [b"a b", b"a\x00", b"a\rb"]
OTHER_NAMES = [b"X-Foo", b"Connection", b"Expect", b"Accept", b"Keep-Alive", b"Trailer"]
OTHER_VALUES = [b"x", b"close", b"keep-alive", b"100-continue", b"a, b", b"\xff\xfe", b"a\tb"]
ODD_OTHER_VALUES = [b"a\x00b", b"a\rb", b"a\nb", b"a\x7fb", b"\x01", b"upgrade"]
BODIES = [
    b"",
    b"abc",
    b"hello world",
    b"0\r\n\r\n",
    b"5\r\nhello\r\n0\r\n\r\n",
    b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
]
CHUNK_DATA = [b"a", b"hello", b"x" * 17, b"\r\n", b"0\r\n\r\n"]
CHUNK_EXTENSIONS = [b"", b"", b";a=b", b';a="b;c"', b";a"]
ODD_CHUNK_EXTENSIONS = [b";", b" ;a", b";a=\x00", b";a\nb"]
TRAILERS = [b"", b"", b"X-T: v\r\n", b"X-T: v\r\nX-U: w\r\n"]
ODD_TRAILERS = [b"X-T : v\r\n", b"Content-Length: 5\r\n", b"X-T: v\n", b" X-T: v\r\n"]
AFTER_BODY = [b"", b"", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"]
ODD_AFTER_BODY = [b"x", b"\r\n", b"G"]


class Chooser:
    """Draws from ``common``, or from ``odd`` with this example's noise probability."""

    def __init__(self, draw: st.DrawFn) -> None:
        self.draw = draw
        self.noise = draw(st.sampled_from(NOISE_LEVELS))
        # Hypothesis biases floats and integers towards their bounds, which would make "odd"
        # far likelier than the noise level says: the coin comes from a seeded Random instead.
        self.coin = draw(st.randoms(use_true_random=False))

    def __call__(self, common: list[bytes], odd: list[bytes] | None = None) -> bytes:
        if odd and self.is_odd():
            return self.draw(st.sampled_from(odd))
        return self.draw(st.sampled_from(common))

    def is_odd(self) -> bool:
        return self.coin.random() < self.noise


def chunked_body(pick: Chooser) -> bytes:
    out = b""
    for _ in range(pick.draw(st.integers(0, 3))):
        data = pick(CHUNK_DATA)
        size = b"%x" % len(data)
        size = pick([size, size.upper(), b"0" + size], [b"0x" + size, b" " + size, size + b" "])
        out += size + pick(CHUNK_EXTENSIONS, ODD_CHUNK_EXTENSIONS) + pick(EOLS, ODD_EOLS)
        out += pick([data], [data[:-1], data + b"x"]) + pick(EOLS, ODD_EOLS)
    out += pick([b"0", b"00", b"0;e=1"], [b"", b"0 ", b"1"]) + pick(EOLS, ODD_EOLS)
    out += pick(TRAILERS, ODD_TRAILERS) + pick(EOLS, ODD_EOLS)
    return out + pick(AFTER_BODY, ODD_AFTER_BODY)


def content_length_value(pick: Chooser, body_len: int) -> bytes:
    n = b"%d" % body_len
    wrong = b"%d" % pick.draw(st.sampled_from([0, 1, 3, body_len + 1, max(body_len - 1, 0)]))
    odd = [b"+" + n, n + b", " + n, n + b"," + wrong, b"-" + n, b"0x" + n, n + b".0", b""]
    odd += [n + b"\x00", b"1e2", b"99999999999999999999999", n + b" " + n]
    return pick([n, n, n, wrong, b"0" + n, b" " + n, n + b" "], odd)


def framing_fields(pick: Chooser, body_len: int) -> list[tuple[bytes, bytes]]:
    """Usually one framing field at most; with noise, any number of each."""
    te_count, cl_count = pick.draw(st.sampled_from([(0, 0), (1, 0), (1, 0), (0, 1), (0, 1)]))
    if pick.is_odd():
        te_count, cl_count = pick.draw(st.integers(0, 2)), pick.draw(st.integers(0, 2))
    fields = [
        (pick(TE_NAMES, ODD_TE_NAMES), pick(TE_VALUES, ODD_TE_VALUES)) for _ in range(te_count)
    ]
    for _ in range(cl_count):
        fields.append((pick(CL_NAMES, ODD_CL_NAMES), content_length_value(pick, body_len)))
    return fields


def field_lines(pick: Chooser, body_len: int) -> list[bytes]:
    fields = framing_fields(pick, body_len)
    host_count = 2 if pick.is_odd() else pick.draw(st.sampled_from([1, 1, 1, 1, 0]))
    for _ in range(host_count):
        fields.append((pick(HOST_NAMES, ODD_HOST_NAMES), pick(HOST_VALUES, ODD_HOST_VALUES)))
    for _ in range(pick.draw(st.integers(0, 2))):
        fields.append((pick(OTHER_NAMES), pick(OTHER_VALUES, ODD_OTHER_VALUES)))
    lines = []
    for name, value in pick.draw(st.permutations(fields)):
        line = name + pick(SEPARATORS, ODD_SEPARATORS) + value
        if pick.is_odd():  # obs-fold: the value continues on the next line
            line += pick(EOLS, ODD_EOLS) + pick([b" ", b"\t"]) + pick([b"chunked", b"x", b""])
        lines.append(line)
    return lines


@st.composite
def grammar_requests(draw: st.DrawFn) -> bytes:
    pick = Chooser(draw)
    body = chunked_body(pick) if draw(st.booleans()) else pick(BODIES)
    request_line = (
        pick(LEADING, ODD_LEADING)
        + pick(METHODS, ODD_METHODS)
        + pick(SPACES, ODD_SPACES)
        + pick(TARGETS, ODD_TARGETS)
        + pick(SPACES, ODD_SPACES)
        + pick(VERSIONS, ODD_VERSIONS)
    )
    lines = [request_line, *field_lines(pick, len(body))]
    head = b"".join(line + pick(EOLS, ODD_EOLS) for line in lines)
    return head + pick(EOLS, ODD_EOLS) + body


VALID_BASES = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;e=1\r\nhello\r\n0\r\nT: v\r\n\r\n",
    b"PUT /q HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"10\r\n0123456789abcdef\r\n0\r\n\r\n",
]
INTERESTING_BYTES = b' \t\r\n:;,=-_0123456789aAfFxX\x00\x0b\x7f\x80\xff"'


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.one_of(st.sampled_from(VALID_BASES), grammar_requests())))
    byte = st.one_of(st.sampled_from(INTERESTING_BYTES), st.integers(0, 255))
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        pos = draw(st.integers(0, len(data)))
        if op == "insert":
            data[pos:pos] = bytes([draw(byte)])
        elif pos < len(data):
            if op == "delete":
                del data[pos]
            else:
                data[pos] = draw(byte)
    return bytes(data)


# 1500 examples of each kind run in a few seconds each; the suppressed checks would only flag
# that the generated inputs are large-ish, which they must be to reach the body.
DIFFERENTIAL = settings(
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def run_differential(strategy: st.SearchStrategy[bytes]) -> Counter[str]:
    seen: Counter[str] = Counter()

    @DIFFERENTIAL
    @given(strategy)
    def property_holds(data: bytes) -> None:
        seen[check_against_h11(data)] += 1

    property_holds()
    return seen


def test_grammar_requests_never_frame_differently_from_h11() -> None:
    seen = run_differential(grammar_requests())
    # The generator must reach both sides of the property, or the test proves nothing; about
    # 350 accepted and 1100 refused are expected.
    assert seen["both-accept"] >= 100, seen
    assert seen["zdlb-refused"] >= 100, seen


def test_mutated_requests_never_frame_differently_from_h11() -> None:
    seen = run_differential(mutated_requests())
    assert seen["both-accept"] >= 40, seen  # about 115 are expected
    assert seen["zdlb-refused"] >= 100, seen


# --- the property itself, on inputs where the answer is known ---------------------------------


@pytest.mark.parametrize(
    ("data", "category"),
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "both-accept", id="plain"),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab",
            "zdlb-refused",
            id="h11-lenient-zdlb-refuses",
        ),
        pytest.param(
            b"\r\nGET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: , chunked\r\n\r\n0\r\n\r\n",
            "accepted-after-normalising",
            id="rfc-leniencies",
        ),
        pytest.param(
            # RFC 9112 section 3 allows parsing runs of spaces leniently; zdlb forwards request
            # lines as received, so it refuses them rather than pass on an ambiguous line.
            b"GET  /  HTTP/1.1\r\nHost: a\r\n\r\n",
            "zdlb-refused",
            id="runs-of-spaces-refused",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\nabc",
            "zdlb-wants-more-body",
            id="partial-body",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloX",
            "zdlb-refused-body",
            id="bad-chunk-end",
        ),
    ],
)
def test_check_categories(data: bytes, category: str) -> None:
    assert check_against_h11(data) == category


@pytest.mark.parametrize(
    "ours",
    [
        pytest.param(Outcome((b"GET", b"/"), 0, True, False), id="accepts-head-h11-refuses"),
        pytest.param(Outcome((b"POST", b"/"), 3, True, False), id="ends-early"),
        pytest.param(Outcome((b"POST", b"/"), 5, True, False), id="ends-late"),
    ],
)
def test_check_fails_on_a_framing_disagreement(ours: Outcome) -> None:
    # A reader that framed differently from h11 must be caught: the check is not vacuous.
    data = (
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"
        if ours.head == (b"GET", b"/")
        else b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nabcd"
    )
    with pytest.raises(AssertionError):
        check_against_h11(data, lambda data, bytewise: ours)


# --- classic probes: CL.TE, TE.CL and TE.TE from the PortSwigger catalogue ---------------------

CL_TE = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n%s\r\n0\r\n\r\nG"
TE_CL = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n%s\r\n8\r\nSMUGGLED\r\n0\r\n\r\n"
TE_ONLY = b"POST / HTTP/1.1\r\nHost: a\r\n%s\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n"

TE_OBFUSCATIONS = [
    pytest.param(b"Transfer-Encoding: chunked\r\n", id="plain"),
    pytest.param(b"Transfer-Encoding: xchunked\r\n", id="xchunked"),
    pytest.param(b"Transfer-Encoding : chunked\r\n", id="space-before-colon"),
    pytest.param(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n", id="chunked-then-x"),
    pytest.param(b"Transfer-Encoding: x\r\nTransfer-Encoding: chunked\r\n", id="x-then-chunked"),
    pytest.param(b"Transfer-Encoding:\tchunked\r\n", id="tab-value"),
    pytest.param(b" Transfer-Encoding: chunked\r\n", id="leading-space-name"),
    pytest.param(b"X: X\nTransfer-Encoding: chunked\r\n", id="bare-lf-before"),
    pytest.param(b"Transfer-Encoding\r\n: chunked\r\n", id="name-split-by-crlf"),
    pytest.param(b"Transfer-Encoding: chunked \r\n", id="trailing-space"),
    pytest.param(b"Transfer-Encoding: \x0bchunked\r\n", id="vtab"),
    pytest.param(b"Transfer_Encoding: chunked\r\n", id="underscore"),
    pytest.param(b"Transfer-Encoding: identity, chunked\r\n", id="identity-chunked"),
    pytest.param(b"Transfer-Encoding: chunked, identity\r\n", id="chunked-identity"),
    pytest.param(b"Transfer-Encoding: \r\n chunked\r\n", id="obs-fold"),
]


@pytest.mark.parametrize("te", TE_OBFUSCATIONS)
@pytest.mark.parametrize("template", [CL_TE, TE_CL], ids=["cl-te", "te-cl"])
def test_classic_cl_te_probes_are_refused(template: bytes, te: bytes) -> None:
    assert_refused_before_head(template % te)


# Transfer-Encoding alone, obfuscated: any framing but plain chunked is refused.
TE_ALONE = [p for p in TE_OBFUSCATIONS if p.id not in ("plain", "tab-value", "trailing-space")]


@pytest.mark.parametrize("te", TE_ALONE)
def test_obfuscated_transfer_encoding_alone_is_refused(te: bytes) -> None:
    assert_refused_before_head(TE_ONLY % te)


OTHER_PROBES = [
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 44\r\n\r\n"
        b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\n",
        id="cl-cl-differing",
    ),
    pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello", id="cl-list"),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent_Length: 44\r\n\r\nGET /admin HTTP/1.1\r\n\r\n",
        id="cl-underscore",
    ),
    pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +44\r\n\r\n", id="cl-plus-sign"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length:\r\n 44\r\n\r\n", id="cl-obs-fold"),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n"
        b"Connection: keep-alive\r\n\r\n0\r\n\r\n",
        id="te-cl-get",
    ),
    pytest.param(
        b"POST / HTTP/1.1\nHost: a\nContent-Length: 4\nTransfer-Encoding: chunked\n\n0\n\n",
        id="bare-lf-everywhere",
    ),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nHost: admin\r\n\r\n", id="double-host"),
]


@pytest.mark.parametrize("data", OTHER_PROBES)
def test_other_classic_probes_are_refused(data: bytes) -> None:
    assert_refused_before_head(data)


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_request_after_an_upgrade_is_held_never_parsed(bytewise: bool) -> None:
    """The upgrade-tunnel probe: what follows an upgrade request is the new protocol's (or,
    without a 101, makes the proxy close), never a request zdlb would route."""
    admin = b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\n"
    upgrade = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    sink = ListSink()
    reader = RequestReader(sink, LIMITS)
    feed(reader, upgrade + admin, bytewise)
    assert sink.head is not None and sink.head.target == b"/"
    assert bytes(reader.held) == admin


# Chunked bodies that a lenient parser would end somewhere else: the head is fine and has been
# forwarded, so the proof is that the request never *ends* (the proxy then closes both sides).
CHUNKED_HEAD = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
BODY_PROBES = [
    pytest.param(b"1;\nx\r\n0\r\n\r\n", id="bare-lf-in-chunk-extension"),
    pytest.param(b"3\r\nabcGET /admin HTTP/1.1\r\n\r\n0\r\n\r\n", id="data-overruns-size"),
    pytest.param(b"0\n\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n", id="bare-lf-last-chunk"),
    pytest.param(b"10000000000000003\r\nabc\r\n0\r\n\r\n", id="size-wraps-64-bits"),
    pytest.param(b"0x3\r\nabc\r\n0\r\n\r\n", id="hex-prefix"),
    pytest.param(b"3 \r\nabc\r\n0\r\n\r\n", id="space-after-size"),
]


@pytest.mark.parametrize("body", BODY_PROBES)
def test_chunked_body_probes_never_end_the_request(body: bytes) -> None:
    for bytewise in (False, True):
        sink = ListSink()
        reader = RequestReader(sink, LIMITS)
        with pytest.raises(DownstreamProtocolError) as info:
            feed(reader, CHUNKED_HEAD + body, bytewise)
        assert info.value.status == 400
        assert sink.head is not None and not sink.is_complete


def feed(reader: RequestReader, data: bytes, bytewise: bool) -> None:
    if bytewise:
        for i in range(len(data)):
            reader.feed(data[i : i + 1])
    else:
        reader.feed(data)


def assert_refused_before_head(data: bytes) -> None:
    for bytewise in (False, True):
        sink = ListSink()
        reader = RequestReader(sink, LIMITS)
        with pytest.raises(DownstreamProtocolError) as info:
            feed(reader, data, bytewise)
        assert info.value.status in (400, 501), info.value
        assert sink.head is None, "a refused probe reached the sink"
