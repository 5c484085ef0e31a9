"""A TLS listener's certificates, swapped for new handshakes without re-listening.

The asyncio listener is given one ``TerminatingContext`` for its whole life. Every accepted
connection asks it for an ``SSLObject`` (``wrap_bio``, which both asyncio and uvloop call once
per connection); it delegates to the current default context, whose ``sni_callback`` then
moves the handshake to the context of the certificate the client's SNI names (names.py).

Rules:
1. What is current follows the route's config: a reload that changes ``[listeners.NAME.tls]``
   (new files, new policy) takes effect at the next handshake, read through ``source``.
2. Every ``watch_s`` the certificate and key files are stat()ed, at the first handshake after
   the interval (no timer: an idle listener costs nothing); a changed (mtime, size) rebuilds the
   contexts from the files. Established connections keep the SSLObject they have.
3. An expiring certificate (under 14 days) is logged when loaded, and once when it crosses
   that line at a later look.
4. A rebuild that fails (a half-written file, a key not matching yet) keeps the contexts that
   serve now, logs once, and is tried again after the next interval.
5. Turning TLS off on a running listener is not possible without re-listening: the listener
   then keeps its last TLS config (config/diff.py's reload refuses the change anyway).
Blocking I/O: a stat() per file per interval, and reading the files on a change, on the loop.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

from zdlb.config.model import CertificateConfig, ListenerTlsConfig
from zdlb.errors import CertificateError
from zdlb.tls.certs import file_signature, inspect_pair
from zdlb.tls.context import certificate_context
from zdlb.tls.expiry import log_expiring
from zdlb.tls.names import NameTable

log = logging.getLogger(__name__)

TlsSource = Callable[[], ListenerTlsConfig | None]
Signature = tuple[tuple[tuple[int, int], ...], ...]


class CertificateSet:
    """The contexts of one listener's certificates, the first being the default."""

    __slots__ = ("certificates", "default", "table")

    def __init__(self, policy: ListenerTlsConfig, certificates: tuple[CertificateConfig, ...]):
        """Raises CertificateError if a pair cannot be loaded."""
        contexts = [certificate_context(policy, cert) for cert in certificates]
        self.certificates = certificates
        pairs = zip(certificates, contexts, strict=True)
        self.table = NameTable([(cert.names, context) for cert, context in pairs])
        self.default = contexts[0]
        for context in contexts:
            context.sni_callback = self._on_sni

    def _on_sni(self, conn: Any, server_name: str | None, context: ssl.SSLContext) -> None:
        """OpenSSL's servername callback: serve the certificate ``server_name`` picks."""
        chosen = self.table.pick(server_name)
        if chosen is not context:
            conn.context = chosen


class TerminatingContext(ssl.SSLContext):
    """The ``ssl=`` of one TLS listener: each new connection is wrapped by the current
    ``CertificateSet``'s default context (rules on top)."""

    def __new__(
        cls, name: str, source: TlsSource, clock: Callable[[], float] = time.monotonic
    ) -> TerminatingContext:
        return super().__new__(cls, ssl.PROTOCOL_TLS_SERVER)

    def __init__(
        self, name: str, source: TlsSource, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """Raises CertificateError if the certificates of ``source()`` cannot be loaded."""
        config = source()
        if config is None:
            raise CertificateError(f"listener {name} has no [tls] table")
        self.listener_name = name
        self._source = source
        self._clock = clock
        self._config = config
        self._signature = _loaded(config.certificates)
        self.current = CertificateSet(config, config.certificates)
        self._next_check_at = clock() + config.watch_s
        self._warned = log_expiring(name, config.certificates, time.time())

    def wrap_bio(  # the same call, delegated to the current default context
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        config = self._source()
        if config is not self._config and config is not None:
            if config != self._config:  # certificates or policy: files are read again
                self._apply(config, "reload")
            self._config = config
        if self._clock() >= self._next_check_at:
            self._check_files()
        return self.current.default.wrap_bio(
            incoming, outgoing, server_side, server_hostname, session
        )

    def _check_files(self) -> None:
        config = self._config
        self._next_check_at = self._clock() + config.watch_s
        if _signature(config.certificates) != self._signature:
            self._apply(config, "files changed")
        else:  # a certificate that entered its last 14 days since it was loaded says so once
            self._warned = log_expiring(
                self.listener_name, self.current.certificates, time.time(), self._warned
            )

    def _apply(self, config: ListenerTlsConfig, reason: str) -> None:
        """Rebuild from ``config``'s files, read again: names and expiry may have changed."""
        self._config = config
        self._next_check_at = self._clock() + config.watch_s
        self._signature = _signature(config.certificates)  # a failure is retried next interval
        try:
            certificates = tuple(inspect_pair(c.cert_file, c.key_file) for c in config.certificates)
            self.current = CertificateSet(config, certificates)
            self._signature = _loaded(certificates)
        except CertificateError as exc:
            log.warning(
                "tls_reload_failed listener=%s reason=%s error=%s kept=previous",
                self.listener_name,
                reason,
                exc,
            )
            return
        log.info(
            "tls_certificates_loaded listener=%s reason=%s names=%s",
            self.listener_name,
            reason,
            ";".join(",".join(c.names) for c in certificates),
        )
        self._warned = log_expiring(self.listener_name, certificates, time.time())


def _signature(certificates: tuple[CertificateConfig, ...]) -> Signature:
    """The files' (mtime, size) now."""
    return tuple(file_signature(cert.cert_file, cert.key_file) for cert in certificates)


def _loaded(certificates: tuple[CertificateConfig, ...]) -> Signature:
    """The files' (mtime, size) when they were read and checked."""
    return tuple(cert.files for cert in certificates)
