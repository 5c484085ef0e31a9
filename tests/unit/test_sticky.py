"""The sticky cookie: values, signatures, Set-Cookie lines, and cutting it out of requests."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zdlb.balancer.sticky import StickyCookie, encode_value, set_cookie_lines
from zdlb.census import with_token
from zdlb.config.model import SameSite, StickyConfig

SECRET = "0123456789abcdef-secret"
IDS = ["front-1", "front-2", "spare"]


def cookie(secret: str | None = None, **changes: object) -> StickyCookie:
    config = StickyConfig("SERVERID", secret=secret, **changes)  # type: ignore[arg-type]
    return StickyCookie(config, "app", IDS)


def head(*fields: bytes) -> bytes:
    lines = b"".join(b"%s\r\n" % f for f in fields)
    return b"GET / HTTP/1.1\r\nHost: a\r\n" + lines + b"\r\n"


def test_unsigned_values_are_the_identity_itself() -> None:
    assert encode_value("front-1", "app", None) == b"front-1"


def test_signed_values_carry_a_tag_bound_to_backend_and_identity() -> None:
    value = encode_value("front-1", "app", SECRET)
    identity, tag = value.split(b".", 1)
    assert identity == b"front-1" and len(tag) == 16
    assert encode_value("front-2", "app", SECRET) != b"front-2." + tag
    assert encode_value("front-1", "other", SECRET) != value
    assert encode_value("front-1", "app", SECRET + "x") != value


def test_no_address_in_any_value() -> None:
    for secret in (None, SECRET):
        assert b"10.0." not in encode_value("front-1", "app", secret)


@pytest.mark.parametrize("secret", [None, SECRET])
def test_a_valid_cookie_is_found_and_cut_out(secret: str | None) -> None:
    sticky = cookie(secret)
    value = encode_value("front-2", "app", secret)
    identity, stripped, _ = sticky.extract(head(b"Cookie: a=1; SERVERID=" + value + b"; b=2"))
    assert identity == "front-2"
    assert stripped == head(b"Cookie: a=1; b=2")


def test_a_cookie_line_holding_only_ours_disappears() -> None:
    identity, stripped, _ = cookie().extract(head(b"Cookie: SERVERID=front-1", b"Accept: */*"))
    assert identity == "front-1"
    assert stripped == head(b"Accept: */*")


def test_without_our_cookie_nothing_changes() -> None:
    for raw in (head(), head(b"Cookie: a=1"), head(b"X-Note: SERVERID=front-1 elsewhere")):
        assert cookie().extract(raw) == (None, None, None)


def test_other_cookie_lines_stay_byte_for_byte() -> None:
    raw = head(b"Cookie: a=1;b=2", b"cookie: SERVERID=front-1", b"Cookie:  c=3")
    identity, stripped, _ = cookie().extract(raw)
    assert identity == "front-1"
    assert stripped == head(b"Cookie: a=1;b=2", b"Cookie:  c=3")


def test_a_cookie_name_is_case_sensitive_and_exact() -> None:
    raw = head(b"Cookie: serverid=front-1; XSERVERID=front-2")
    assert cookie().extract(raw) == (None, None, None)


FORGED = [
    pytest.param(b"SERVERID=front-1", id="unsigned-when-signing"),
    pytest.param(b"SERVERID=front-1.AAAAAAAAAAAAAAAAAAAAAA", id="bad-tag"),
    pytest.param(b"SERVERID=", id="empty"),
    pytest.param(b"SERVERID=10.0.0.1:8081", id="an-address"),
    pytest.param(b"SERVERID=\xff\xfe", id="binary"),
]


@pytest.mark.parametrize("pair", FORGED)
def test_forged_or_garbage_values_are_ignored_and_still_stripped(pair: bytes) -> None:
    identity, stripped, _ = cookie(SECRET).extract(head(b"Cookie: " + pair + b"; a=1"))
    assert identity is None
    assert stripped == head(b"Cookie: a=1")


def test_a_tag_from_another_identity_does_not_verify() -> None:
    tag = encode_value("front-2", "app", SECRET).split(b".")[1]
    identity, _, _ = cookie(SECRET).extract(head(b"Cookie: SERVERID=front-1." + tag))
    assert identity is None


def test_several_cookies_that_agree_count_once_and_disagreeing_ones_count_none() -> None:
    agree = head(b"Cookie: SERVERID=front-1", b"Cookie: SERVERID=front-1")
    assert cookie().extract(agree) == ("front-1", head(), None)
    disagree = head(b"Cookie: SERVERID=front-1; SERVERID=front-2")
    assert cookie().extract(disagree) == (None, head(), None)


def test_a_quoted_value_is_accepted() -> None:
    assert cookie().extract(head(b'Cookie: SERVERID="front-1"'))[0] == "front-1"


@given(st.binary(max_size=200))
def test_any_cookie_line_never_raises_and_leaves_no_cookie_of_ours(value: bytes) -> None:
    clean = value.replace(b"\r", b"").replace(b"\n", b"")
    raw = head(b"Cookie: " + clean)
    identity, stripped, _ = cookie(SECRET).extract(raw)
    assert identity is None  # a random value never verifies
    out = stripped if stripped is not None else raw
    assert out.startswith(b"GET / HTTP/1.1\r\nHost: a\r\n") and out.endswith(b"\r\n\r\n")
    if stripped is not None:
        lines = out[:-4].split(b"\r\n")[2:]
        pairs = [p for line in lines for p in line.partition(b":")[2].split(b";")]
        assert b"SERVERID" not in [p.strip().partition(b"=")[0] for p in pairs]


def test_set_cookie_line_defaults() -> None:
    line = set_cookie_lines(StickyConfig("SERVERID"), b"front-1")
    assert line == b"Set-Cookie: SERVERID=front-1; Path=/; HttpOnly; SameSite=Lax\r\n"


def test_set_cookie_line_with_every_attribute() -> None:
    config = StickyConfig(
        "sid",
        path="/app",
        domain="example.com",
        secure=True,
        httponly=False,
        samesite=SameSite.NONE,
        max_age=3600,
        nocache=True,
    )
    assert set_cookie_lines(config, b"v") == (
        b"Set-Cookie: sid=v; Path=/app; Domain=example.com; Max-Age=3600; Secure; SameSite=None"
        b"\r\nCache-Control: private\r\n"
    )


def test_set_cookie_is_prepared_per_identity() -> None:
    sticky = cookie(SECRET)
    line = sticky.set_cookie("front-2")
    assert line.startswith(b"Set-Cookie: SERVERID=" + encode_value("front-2", "app", SECRET))
    with pytest.raises(KeyError):
        sticky.set_cookie("unknown")


def test_a_user_token_after_the_value_is_returned_and_stripped_with_the_cookie() -> None:
    """census.py's ``VALUE~TOKEN``: the host part still routes, the token is handed back."""
    raw = head(b"Cookie: a=1; SERVERID=front-1~0123456789abcdef")
    identity, stripped, token = cookie().extract(raw)
    assert (identity, token) == ("front-1", b"0123456789abcdef")
    assert stripped == head(b"Cookie: a=1")


def test_a_token_on_a_forged_value_is_not_returned() -> None:
    assert cookie(SECRET).extract(head(b"Cookie: SERVERID=front-1~0123456789abcdef"))[::2] == (
        None,
        None,
    )


_PAIRS = st.sampled_from(
    [
        b"SERVERID=front-1",
        b"SERVERID=front-2",
        b"SERVERID=front-1~0123456789abcdef",
        b'SERVERID="front-2"',
        b"SERVERID=nobody",
        b"SERVERID=",
        b"XSERVERID=front-1",
        b"a=1",
        b"b=SERVERID=front-1",
        b"",
        b" c = 3 ",
    ]
)
_LINES = st.lists(_PAIRS, max_size=4).map(lambda pairs: b";".join(pairs))
_FIELDS = st.sampled_from([b"Cookie: ", b"cookie: ", b"Cookie:", b"COOKIE:\t", b"X-Note: "])


@given(
    fields=st.lists(st.tuples(_FIELDS, _LINES), min_size=1, max_size=3),
    target=st.sampled_from([b"/", b"/?SERVERID=front-2"]),
)
def test_the_remembered_cookie_line_answers_as_the_full_scan(
    fields: list[tuple[bytes, bytes]], target: bytes
) -> None:
    """extract()'s shortcut (one "Cookie: " line holding our cookie, its outcome remembered)
    gives exactly what the scan of every Cookie line gives, the first time and from memory."""
    sticky = cookie()
    lines = b"".join(b"%s%s\r\n" % (name, value) for name, value in fields)
    raw = b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n" + lines + b"\r\n"
    expected = sticky._extract_anywhere(raw)
    assert sticky.extract(raw) == expected
    assert sticky.extract(raw) == expected  # now from memory, if the shortcut applied


@pytest.mark.parametrize("secret", [None, SECRET], ids=["unsigned", "signed"])
def test_token_lines_pin_as_with_token_does(secret: str | None) -> None:
    """The connection pins a user with ``token_lines`` (no call): the bytes with_token makes."""
    sticky = cookie(secret, max_age=60, nocache=True)
    token = b"0123456789abcdef"
    for identity in IDS:
        before, after = sticky.token_lines[identity]
        assert before + token + after == with_token(sticky.lines[identity], token)
