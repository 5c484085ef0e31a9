"""Building ``ssl.SSLContext`` objects from the config: one per certificate of a TLS listener,
all with the listener's policy, and one per backend that speaks TLS to its servers.

What the stdlib allows, and what it does not (said in the README too):
- Protocol floor, TLS 1.2 cipher suites, ALPN, session tickets: yes.
- TLS 1.3 suites and the key-exchange group list: not settable before Python 3.13/3.15; the
  OpenSSL defaults (AEAD suites; X25519, P-256, X448, P-521, P-384) are the modern ones anyway.
- OCSP stapling on the server side: no API at all (no ``SSL_CTX_set_tlsext_status_cb``).
- kTLS: OpenSSL could, but ``ssl`` does not enable it and owns the socket's I/O, so TLS bytes
  always pass through Python and can never be spliced.
Reads the certificate files named; no other I/O.
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass

from zdlb.config.model import (
    CertificateConfig,
    ListenerTlsConfig,
    TlsVersion,
    UpstreamTlsConfig,
)
from zdlb.tls.certs import load_pair

_VERSIONS = {
    TlsVersion.TLS1_2: ssl.TLSVersion.TLSv1_2,
    TlsVersion.TLS1_3: ssl.TLSVersion.TLSv1_3,
}


def policy_context(policy: ListenerTlsConfig) -> ssl.SSLContext:
    """A server context with ``policy`` and no certificate yet. Raises ssl.SSLError for a
    cipher string that selects nothing (config/tls.py checks that first)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[policy.min_version]
    context.set_ciphers(policy.ciphers)
    # The server's order: the client's may put a weak suite first. No renegotiation: a
    # client-initiated one is a CPU DoS (CVE-2011-1473) and HTTP/1.1 over TLS never needs it.
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    if policy.alpn:
        context.set_alpn_protocols(list(policy.alpn))
    if not policy.session_tickets:
        context.options |= ssl.OP_NO_TICKET
        context.num_tickets = 0
    return context


def certificate_context(policy: ListenerTlsConfig, cert: CertificateConfig) -> ssl.SSLContext:
    """A server context serving ``cert``. Raises CertificateError."""
    context = policy_context(policy)
    load_pair(context, cert.cert_file, cert.key_file)
    return context


def upstream_context(tls: UpstreamTlsConfig) -> ssl.SSLContext:
    """A client context for a backend's servers: verified against ``ca_file`` (or the system
    store) unless ``verify`` is off. Raises OSError/ssl.SSLError for an unreadable CA file."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif tls.ca_file is not None:
        context.load_verify_locations(cafile=tls.ca_file)
    else:
        context.load_default_certs()
    return context


@dataclass(frozen=True, slots=True)
class Origination:
    """How to speak TLS to one server: the backend's context and the name sent (SNI) and
    verified. An IP literal is verified against the certificate's IP SANs, and not sent."""

    context: ssl.SSLContext
    server_hostname: str


def originate(tls: UpstreamTlsConfig | None, host: str) -> Origination | None:
    """The TLS settings for connections to ``host``; None when the backend speaks plain TCP."""
    if tls is None:
        return None
    return Origination(shared_upstream_context(tls), tls.sni or host)


@functools.lru_cache(maxsize=64)
def shared_upstream_context(tls: UpstreamTlsConfig) -> ssl.SSLContext:
    """One context per backend TLS config, shared by its servers' pools and checks (the CA
    file is read once; a reload with the same settings keeps it, a changed one builds anew)."""
    return upstream_context(tls)
