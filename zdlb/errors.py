"""Every exception zdlb raises, in one hierarchy.

Protocol errors are split by blame (downstream = the client, upstream = the server) and carry
the HTTP status zdlb answers with. Upstream I/O failures also subclass the stdlib exception they
are (``ConnectionError``, ``TimeoutError``) so generic handlers still catch them. ``OSError`` is
translated into these in one place per layer; callers never see a raw ``ConnectionResetError``.
No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass


class ZdlbError(Exception):
    """Root of every error zdlb raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem found in a config file: where, and what is wrong."""

    key_path: str  # e.g. "backends.app.servers[1].address"
    message: str  # e.g. "'nonsense' is not host:port"

    def __str__(self) -> str:
        return f"{self.key_path}: {self.message}" if self.key_path else self.message


class ConfigError(ZdlbError):
    """The config file is unreadable or invalid; carries every issue found, not just the first."""

    def __init__(self, source: str, issues: list[ConfigIssue]) -> None:
        self.source = source
        self.issues = issues
        lines = "\n".join(f"  {issue}" for issue in issues)
        super().__init__(f"{source}: {len(issues)} error(s)\n{lines}")


class ProtocolError(ZdlbError):
    """Bytes on the wire broke HTTP/1.1; ``status`` is what zdlb answers downstream."""

    status: int = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class DownstreamProtocolError(ProtocolError):
    """The client sent something zdlb will not forward: answer ``status`` (4xx) and close."""

    status = 400


class UpstreamProtocolError(ProtocolError):
    """The server answered garbage: answer 502 and count it against the server."""

    status = 502


class UpstreamError(ZdlbError):
    """A server could not be used for this request."""

    status: int = 502


class UpstreamConnectError(UpstreamError, ConnectionError):
    """Connecting to the server was refused or failed; safe to retry on another server."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """The server did not connect or answer within its deadline."""

    status = 504


class UpstreamReset(UpstreamError, ConnectionError):
    """The server closed or reset the connection before the response was complete."""


class NoServerAvailable(ZdlbError):
    """No server in the backend is usable right now: answer 503."""

    status = 503


class ListenerError(ZdlbError, OSError):
    """A listener could not bind its address (in use, permission denied, bad interface)."""


class ControlUsageError(ZdlbError):
    """A control command that is unknown or malformed: nothing changed; ``usage`` says how."""

    def __init__(self, message: str, usage: str) -> None:
        super().__init__(message)
        self.usage = usage


class ControlCommandError(ZdlbError):
    """A well-formed control command that cannot be carried out (no such server...)."""


class ClusterUnavailable(ZdlbError):
    """etcd (``[cluster]``) did not answer, or answered an error: the fleet's shared state
    cannot be read or changed now. Each instance keeps serving its last state."""


class ClusterConflict(ZdlbError):
    """A change lost a race: another instance changed the same server since this one last
    saw it (an etcd transaction's compare failed). Nothing changed."""


class CertificateError(ZdlbError):
    """A TLS certificate or key file cannot be used: missing, not PEM, encrypted, or the key
    does not belong to the certificate. The message names the file and the reason."""
