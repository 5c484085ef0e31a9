"""Addresses in the config: ``host:port`` parsing and listener bind clashes. Pure, no I/O.

A bind address must be an IP literal (zdlb binds before resolving anything, and a name could
resolve to several addresses); a server address may also be a DNS name.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from zdlb.config.model import Address

MAX_PORT = 65535

_HOST_PORT_RE = re.compile(r"(?:\[(?P<ipv6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>[0-9]+)")
# RFC 1123 labels; "_" is tolerated because container runtimes hand out such names.
_DNS_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_MAX_DNS_NAME_CHARS = 253  # RFC 1035 section 2.3.4, without the trailing dot


def parse_address(text: str, is_bind: bool) -> Address:
    """``host:port`` or ``[ipv6]:port``. Raises ValueError with the message for the user.

    A bind host must be an IP literal and may use port 0 (any free port).
    """
    match = _HOST_PORT_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not host:port")
    min_port = 0 if is_bind else 1
    port = int(match["port"])
    problem: str | None = None
    if not min_port <= port <= MAX_PORT:
        problem = f"port must be between {min_port} and {MAX_PORT}"
    elif match["ipv6"] is not None:
        host = match["ipv6"]
        problem = None if _is_ip(host, version=6) else f"{host!r} is not an IPv6 address"
    else:
        host = match["host"]
        if is_bind and not _is_ip(host, version=4):
            problem = f"host must be an IPv4 or [IPv6] literal, got {host!r}"
        elif not is_bind and not (_is_ip(host, version=4) or _is_dns_name(host)):
            problem = f"{host!r} is neither an IPv4 address nor a DNS name"
    if problem is not None:
        raise ValueError(f"{text!r}: {problem}")
    return Address(host, port)


def _is_ip(text: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def _is_dns_name(text: str) -> bool:
    name = text.removesuffix(".")
    labels = name.split(".")
    # An all-numeric last label is a mistyped IPv4 address, not a name (RFC 3696 section 2).
    return (
        len(name) <= _MAX_DNS_NAME_CHARS
        and all(_DNS_LABEL_RE.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )


def bind_clashes(binds: Iterable[tuple[str, Address]]) -> list[tuple[str, str]]:
    """Pairs ``(name, earlier name)`` of binds on the same port and an overlapping IP.

    Port 0 never clashes: the kernel picks a distinct free port for each. IPv4 and IPv6
    wildcards do not clash with each other: the IPv6 socket sets IPV6_V6ONLY.
    """
    clashes = []
    seen: list[tuple[str, Address, ipaddress.IPv4Address | ipaddress.IPv6Address]] = []
    for name, bind in binds:
        if bind.port == 0:
            continue
        ip = ipaddress.ip_address(bind.host)
        for other_name, other, other_ip in seen:
            is_wildcard = ip.is_unspecified or other_ip.is_unspecified
            overlaps = ip == other_ip or (ip.version == other_ip.version and is_wildcard)
            if other.port == bind.port and overlaps:
                clashes.append((name, other_name))
                break
        seen.append((name, bind, ip))
    return clashes
