"""Reading the TLS parts of the config: ``[listeners.NAME.tls]`` (termination) and a backend's
``tls``, ``verify``, ``ca_file``, ``sni`` (TLS to its servers).

Unlike the rest of config/, this reads files: a certificate and its key are loaded exactly as a
listener will load them, so ``zdlb check`` and a reload refuse a missing, malformed, encrypted
or mismatched pair with the file and the reason, and the summary can list the names each
certificate serves and its expiry. Called from config/load.py; binds nothing.
"""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import Sequence
from pathlib import Path

from zdlb.config.model import (
    TLS_EXPIRY_WARNING_S,
    CertificateConfig,
    ListenerConfig,
    ListenerMode,
    ListenerTlsConfig,
    TlsVersion,
    UpstreamTlsConfig,
)
from zdlb.config.table import Table
from zdlb.errors import CertificateError, ConfigIssue
from zdlb.tls.certs import inspect_pair
from zdlb.tls.context import upstream_context

LISTENER_TLS_KEYS = (
    "certificates",
    "min_version",
    "ciphers",
    "alpn",
    "session_tickets",
    "hsts_max_age",
    "handshake_s",
    "watch_s",
)
BACKEND_TLS_KEYS = ("tls", "verify", "ca_file", "sni")
_CERT_KEYS = ("cert", "key")
_HTTP_ALPN = ("http/1.1",)  # h2 needs an HTTP/2 connection first: the room is left here
_HTTP_ONLY_TLS_KEYS = ("hsts_max_age",)
# A DNS name as sent in SNI (RFC 6066 section 3: a host name, no IP literal, no port).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*\.?")
_DEFAULTS = ListenerTlsConfig(certificates=())


def read_listener_tls(
    listener: Table, mode: ListenerMode, handshake_s: float, base_dir: Path
) -> ListenerTlsConfig | None:
    """``[listeners.NAME.tls]``, or None without one. ``handshake_s``: the default deadline
    (the listener's ``http_request_s``). Issues are recorded on ``listener``'s list."""
    if not listener.has("tls"):
        return None
    table = listener.table("tls", LISTENER_TLS_KEYS)
    if mode is ListenerMode.TCP:
        for key in _HTTP_ONLY_TLS_KEYS:
            if table.has(key):
                table.fail(key, f"not used by mode = {mode.value!r} listeners")
    certificates = _read_certificates(table, base_dir)
    hsts = table.integer_or_false("hsts_max_age", _DEFAULTS.hsts_max_age, minimum=0)
    return ListenerTlsConfig(
        certificates=certificates,
        min_version=table.enum_choice("min_version", TlsVersion, _DEFAULTS.min_version),
        ciphers=_read_ciphers(table),
        alpn=_read_alpn(table, mode),
        session_tickets=table.boolean("session_tickets", _DEFAULTS.session_tickets),
        hsts_max_age=hsts,
        handshake_s=table.seconds("handshake_s", handshake_s),
        watch_s=table.seconds("watch_s", _DEFAULTS.watch_s),
    )


def _read_certificates(table: Table, base_dir: Path) -> tuple[CertificateConfig, ...]:
    if table.data.get("certificates", []) == []:
        table.fail("certificates", "at least one certificate is needed ({cert, key} tables)")
        return ()
    certificates = []
    for entry in table.array_of_tables("certificates", _CERT_KEYS):
        cert_text = entry.required_string("cert")
        key_text = entry.data.get("key", cert_text)
        if not isinstance(key_text, str):
            entry.fail("key", f"expected a string, got {key_text!r}")
            continue
        if cert_text is None:
            continue
        cert_file, key_file = base_dir / cert_text, base_dir / key_text
        try:
            certificates.append(inspect_pair(cert_file, key_file))
        except CertificateError as exc:
            _fail_certificate(entry, exc, cert_file, key_file)
    return tuple(certificates)


def _fail_certificate(entry: Table, exc: CertificateError, cert: Path, key: Path) -> None:
    """A missing file is the key's fault (``...certificates[0].key``); a bad pair is the
    entry's (``...certificates[0]``)."""
    message = str(exc)
    if message.startswith(("file not found: ", "cannot read ")):
        missing_key = str(key) in message and str(cert) not in message
        entry.fail("key" if missing_key and entry.has("key") else "cert", message)
    else:
        entry.issues.append(ConfigIssue(entry.path, message))


def _read_ciphers(table: Table) -> str:
    if not table.has("ciphers"):
        return _DEFAULTS.ciphers
    text = table.required_string("ciphers")
    if text is None:
        return _DEFAULTS.ciphers
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(text)
    except ssl.SSLError:
        table.fail("ciphers", f"{text!r} selects no cipher suite OpenSSL knows")
        return _DEFAULTS.ciphers
    return text


def _read_alpn(table: Table, mode: ListenerMode) -> tuple[str, ...]:
    default = _HTTP_ALPN if mode is ListenerMode.HTTP else ()
    if not table.has("alpn"):
        return default
    value = table.data["alpn"]
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        table.fail("alpn", f"expected a list of protocol names, got {value!r}")
        return default
    if mode is ListenerMode.HTTP:
        for item in value:
            if item not in _HTTP_ALPN:
                table.fail("alpn", f"{item!r} is not served (http listeners speak http/1.1)")
                return default
    return tuple(str(item) for item in value)


def read_backend_tls(backend: Table, base_dir: Path) -> UpstreamTlsConfig | None:
    """A backend's ``tls = true`` and its ``verify``, ``ca_file``, ``sni``; None for plain TCP.
    The CA file is loaded now, so a bad one is refused with the config."""
    is_tls = backend.boolean("tls", False)
    if not is_tls:
        for key in BACKEND_TLS_KEYS[1:]:
            if backend.has(key):
                backend.fail(key, "only used with tls = true")
        return None
    verify = backend.boolean("verify", True)
    ca_file = None
    if backend.has("ca_file"):
        text = backend.required_string("ca_file")
        if text is not None:
            ca_file = base_dir / text
    sni = None
    if backend.has("sni"):
        sni = backend.required_string("sni")
        if sni is not None and not _HOSTNAME_RE.fullmatch(sni):
            backend.fail("sni", f"{sni!r} is not a DNS host name")
            sni = None
    tls = UpstreamTlsConfig(verify, ca_file, sni)
    if ca_file is not None:
        if not verify:
            backend.fail("ca_file", "not used with verify = false")
        elif not ca_file.is_file():
            backend.fail("ca_file", f"file not found: {ca_file}")
        else:
            try:
                upstream_context(tls)
            except (ssl.SSLError, OSError) as exc:
                backend.fail("ca_file", f"{ca_file}: no CA certificate could be loaded ({exc})")
    return tls


def describe_certificates(listeners: Sequence[ListenerConfig], now: float) -> list[str]:
    """``zdlb check``'s lines for TLS listeners: per certificate, the names it serves, which
    one is the default, and its expiry (flagged under 14 days)."""
    lines = []
    for listener in listeners:
        tls = listener.tls
        if tls is None:
            continue
        lines.append(f"  {listener.name}: TLS >= {tls.min_version.value}, {_tls_extras(tls)}")
        for index, cert in enumerate(tls.certificates):
            default = " (default)" if index == 0 else ""
            lines.append(
                f"    {', '.join(cert.names)}{default}: {expiry_text(cert.not_after, now)}"
            )
    return ["tls:", *lines] if lines else []


def _tls_extras(tls: ListenerTlsConfig) -> str:
    parts = [f"alpn={','.join(tls.alpn) or 'none'}"]
    parts.append("tickets" if tls.session_tickets else "no tickets")
    if tls.hsts_max_age is not None:
        parts.append(f"hsts max-age={tls.hsts_max_age}")
    return ", ".join(parts)


def expiry_text(not_after: float, now: float) -> str:
    """``expires 2026-12-12 (in 10 days)``, with ``EXPIRING`` or ``EXPIRED`` when it is due."""
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(not_after))
    left_s = not_after - now
    if left_s <= 0:
        return f"EXPIRED {date}"
    days = left_s / 86400
    flag = "EXPIRING " if left_s < TLS_EXPIRY_WARNING_S else ""
    return f"{flag}expires {date} (in {days:.0f} days)"
