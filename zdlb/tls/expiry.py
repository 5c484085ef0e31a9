"""When each TLS listener's certificates expire, read from the files as they are now (a
certificate replaced on disk counts from the moment it is), for ``show info``, the metrics and
the log. Reads a file only when its (mtime, size) changed since the last look."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from zdlb.config.model import TLS_EXPIRY_WARNING_S, CertificateConfig, ListenerConfig
from zdlb.errors import CertificateError
from zdlb.tls.certs import file_signature, read_leaf

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CertificateExpiry:
    listener: str
    cert_file: Path
    names: tuple[str, ...]
    not_after: float  # epoch seconds; 0.0 when the file cannot be read now

    def left_s(self, now: float) -> float:
        return self.not_after - now

    def is_expiring(self, now: float) -> bool:
        return self.left_s(now) < TLS_EXPIRY_WARNING_S


class ExpiryReader:
    """Certificate expiries of some listeners, re-read only for files that changed."""

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[Path, tuple[object, tuple[tuple[str, ...], float]]] = {}

    def read(self, listeners: Iterable[ListenerConfig]) -> list[CertificateExpiry]:
        found = []
        for listener in listeners:
            if listener.tls is None:
                continue
            for cert in listener.tls.certificates:
                names, not_after = self._leaf(cert)
                found.append(CertificateExpiry(listener.name, cert.cert_file, names, not_after))
        return found

    def _leaf(self, cert: CertificateConfig) -> tuple[tuple[str, ...], float]:
        signature = file_signature(cert.cert_file)
        cached = self._cache.get(cert.cert_file)
        if cached is not None and cached[0] == signature:
            return cached[1]
        try:
            leaf = read_leaf(cert.cert_file)
        except CertificateError:
            leaf = (cert.names, 0.0)  # gone or broken: the listener logs it when it looks
        self._cache[cert.cert_file] = (signature, leaf)
        return leaf


def log_expiring(
    listener: str,
    certificates: Iterable[CertificateConfig],
    now: float,
    warned: frozenset[Path] = frozenset(),
) -> frozenset[Path]:
    """One WARNING per certificate that expires within 14 days (or has expired), unless its
    file is in ``warned``; returns the files warned about, these included."""
    done = set(warned)
    for cert in certificates:
        left_s = cert.not_after - now
        if left_s < TLS_EXPIRY_WARNING_S and cert.cert_file not in done:
            done.add(cert.cert_file)
            log.warning(
                "tls_certificate_expiring listener=%s cert=%s names=%s days_left=%.1f",
                listener,
                cert.cert_file,
                ",".join(cert.names),
                left_s / 86400,
            )
    return frozenset(done)


def info_fields(listeners: Iterable[ListenerConfig], now: float) -> dict[str, object]:
    """``show info``'s TLS lines: how many certificates are served, and which expire within
    14 days (``none``); nothing at all without a TLS listener. A listener listed twice (a
    route a reload retired, still draining) counts once, as its first entry."""
    unique: dict[str, ListenerConfig] = {}
    for listener in listeners:
        unique.setdefault(listener.name, listener)
    found = ExpiryReader().read(unique.values())
    if not found:
        return {}
    expiring = [
        f"{','.join(c.names)} ({c.listener}) in {c.left_s(now) / 86400:.1f} days"
        for c in found
        if c.is_expiring(now)
    ]
    return {"tls_certificates": len(found), "tls_expiring": "; ".join(expiring) or "none"}
