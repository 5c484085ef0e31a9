"""Certificate files: check that a PEM chain and its key belong together, and read what the
leaf certificate serves (its DNS names) and until when.

The only I/O is reading the two files named. Used by config/tls.py (``zdlb check``, reload)
and by listener.py when a file's mtime changes; each raises ``CertificateError`` naming the
file and the reason, never an ``ssl.SSLError``.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from zdlb.config.model import CertificateConfig
from zdlb.errors import CertificateError

# OpenSSL reasons worth a plain sentence; the rest are shown as OpenSSL words them.
_REASONS = {
    "KEY_VALUES_MISMATCH": "the key does not belong to the certificate",
    "NO_START_LINE": "no PEM block found",
    "PEM lib": "not a PEM certificate chain and key OpenSSL can read",
    "BAD_DECRYPT": "the key is encrypted (zdlb takes unencrypted PEM keys only)",
    "BAD_PASSWORD_READ": "the key is encrypted (zdlb takes unencrypted PEM keys only)",
}


def _no_password() -> bytes:
    # Without a callable, OpenSSL would prompt on the terminal for an encrypted key's password.
    raise CertificateError("the key is encrypted (zdlb takes unencrypted PEM keys only)")


def load_pair(context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    """``context.load_cert_chain`` with readable errors. Raises CertificateError."""
    for path in dict.fromkeys((cert_file, key_file)):
        if not path.is_file():
            raise CertificateError(f"file not found: {path}")
        if not os.access(path, os.R_OK):
            raise CertificateError(f"cannot read {path}: permission denied")
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    except CertificateError:
        raise
    except ssl.SSLError as exc:
        # OpenSSL 3 leaves ``reason`` unset for some PEM failures ("[SSL] PEM lib").
        code = exc.reason or ("PEM lib" if "PEM lib" in str(exc) else "")
        reason = _REASONS.get(code, exc.reason or str(exc))
        raise CertificateError(f"{cert_file} + {key_file}: {reason}") from exc
    except OSError as exc:
        raise CertificateError(f"cannot read {exc.filename or cert_file}: {exc.strerror}") from exc


def inspect_pair(cert_file: Path, key_file: Path) -> CertificateConfig:
    """Load the pair as a server would and read the leaf's names and expiry.

    Raises CertificateError if a file is missing or unreadable, not PEM, the key is encrypted
    or does not match, or the certificate names no DNS name.
    """
    files = file_signature(cert_file, key_file)  # before reading: a later write is a change
    load_pair(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert_file, key_file)
    names, not_after = read_leaf(cert_file)
    if not names:
        raise CertificateError(f"{cert_file}: the certificate names no DNS name (SAN or CN)")
    return CertificateConfig(cert_file, key_file, names, not_after, files)


def read_leaf(cert_file: Path) -> tuple[tuple[str, ...], float]:
    """The DNS names (subjectAltName, else the subject's CN: RFC 6125 section 6.4.4) of the
    first certificate in ``cert_file``, lower case, and its notAfter in epoch seconds."""
    try:
        # The stdlib decodes a certificate only through this helper (its own tests use it)
        # or from a live peer; getpeercert() would need a handshake with ourselves.
        decoded = ssl._ssl._test_decode_cert(os.fspath(cert_file))  # type: ignore[attr-defined]
    except (ssl.SSLError, OSError) as exc:
        raise CertificateError(f"{cert_file}: not a PEM certificate ({exc})") from exc
    sans = [value for kind, value in decoded.get("subjectAltName", ()) if kind == "DNS"]
    if not sans:
        subject = decoded.get("subject", ())
        sans = [value for rdn in subject for key, value in rdn if key == "commonName"]
    names = tuple(dict.fromkeys(str(name).lower().rstrip(".") for name in sans))
    return names, float(ssl.cert_time_to_seconds(decoded["notAfter"]))


def file_signature(*paths: Path) -> tuple[tuple[int, int], ...]:
    """(mtime_ns, size) of each file: what the watcher compares. A missing file gives (0, 0),
    so its return is a change too."""
    signature = []
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            signature.append((0, 0))
        else:
            signature.append((stat.st_mtime_ns, stat.st_size))
    return tuple(signature)
