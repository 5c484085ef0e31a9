"""The sticky cookie on a request's path: which server a returning user goes to, and the
``Set-Cookie`` lines that pin a user to its server (balancer/sticky.py encodes the cookie,
census.py counts the users).

The rules:

1. A request carrying zdlb's cookie goes to the host it names if that host can serve
   (``Backend.select_sticky`` decides); else to a balanced pick, which
   the answer pins the user to (a *repin*, counted).
2. The server never sees zdlb's cookie: it is cut from the head before forwarding.
3. A user keeps one token (census.py) for as long as it keeps its cookie: the one its cookie
   carries, else the one this client connection already minted, else a new one. A returning
   user is counted once per client connection, not per request.
4. A cookie that only looks like zdlb's (no valid signature) is no cookie: the head is left as
   it came and the request is balanced.

Both functions run on the hot path (``pin`` once per request that is not pinned yet,
``select_sticky`` once per request that carries the cookie), each for one call, the cost the
connection's methods had. They take the client connection (``Pinned``) explicitly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from zdlb.census import mint_token

if TYPE_CHECKING:
    from zdlb.balancer.server import Server
    from zdlb.balancer.sticky import StickyCookie
    from zdlb.http.exchange import Exchange
    from zdlb.http.route import Destination


class Pinned(Protocol):
    """What pinning needs of a client connection: where its request goes, who its client is."""

    dest: Destination
    client_ip: bytes
    user_token: bytes  # the sticky census token of this connection's user, once known


def select_sticky(
    conn: Pinned, exchange: Exchange, sticky: StickyCookie, now: float
) -> Server | None:
    """The client's pinned host if it can serve, else a balanced pick to pin it to (rule 1),
    or None when no server can serve."""
    head = exchange.request
    identity, stripped, token = sticky.extract(head.raw)
    if stripped is not None:
        head.raw = stripped  # rule 2
    dest = conn.dest
    backend = dest.backend
    server = backend.select_sticky(identity, now) if identity is not None else None
    if server is None:
        server = backend.select(now, conn.client_ip)
        if identity is not None and server is not None:
            dest.backend_stats.sticky_repins += 1
    exchange.identity = identity
    if server is None:
        return None
    if server.identity != identity or token is None:  # (re-)pin, the user's token kept
        exchange.set_cookie = pin(conn, sticky, server.identity, token)
    elif token != conn.user_token:  # a returning user: counted once per connection (rule 3)
        conn.user_token = token
        census = dest.census
        if census is not None:
            census.observe(identity, token)
    return server


def pin(conn: Pinned, sticky: StickyCookie, identity: str, token: bytes | None) -> bytes:
    """The Set-Cookie lines that pin this client to ``identity``, with its user token
    (rule 3)."""
    token = token or conn.user_token or mint_token()
    census = conn.dest.census
    if census is not None and token != conn.user_token:
        census.observe(identity, token)
    conn.user_token = token
    before, after = sticky.token_lines[identity]  # census.with_token's bytes, no call
    return before + token + after
