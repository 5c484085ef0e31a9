"""The demo's HTTPS listener: a throw-away CA and a ``localhost`` certificate made with the
``openssl`` command at every ``zdlb demo`` start (in ``demo-tls/`` next to the config file;
nothing private is ever committed), and a listener ``https`` on 127.0.0.1:8443 added to the
demo's config in memory, serving the same backend as its first HTTP listener.

The listener is the demo's own: it is not in config.toml (whose ``zdlb check`` must pass on a
fresh checkout, before any certificate exists), so a ``zdlb ctl reload`` of config.toml during
the demo removes it. Without ``openssl`` the demo runs without it, and says so.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import subprocess
from pathlib import Path

from zdlb.config.model import Address, Config, ListenerMode, ListenerTlsConfig
from zdlb.errors import CertificateError
from zdlb.tls.certs import inspect_pair

log = logging.getLogger(__name__)

DEMO_TLS_DIR = "demo-tls"
DEMO_HTTPS_BIND = Address("127.0.0.1", 8443)
DEMO_HSTS_MAX_AGE = 300  # short: a browser that met the demo forgets it in 5 minutes
_OPENSSL_TIMEOUT_S = 30.0
_LEAF_EXTENSIONS = (
    "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n"
    "basicConstraints=critical,CA:FALSE\n"
    "keyUsage=critical,digitalSignature\n"
    "extendedKeyUsage=serverAuth\n"
    "subjectKeyIdentifier=hash\n"
    "authorityKeyIdentifier=keyid\n"
)


def make_demo_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A new P-256 CA (``ca.pem``) and a ``localhost`` certificate it signs (``localhost.pem``
    with the chain, ``localhost.key``), valid 30 days. Raises CertificateError without
    ``openssl`` or when it fails."""
    if shutil.which("openssl") is None:
        raise CertificateError("the openssl command is not installed")
    directory.mkdir(mode=0o700, exist_ok=True)
    ca_key, ca, key = directory / "ca.key", directory / "ca.pem", directory / "localhost.key"
    csr, leaf, ext = directory / "localhost.csr", directory / "leaf.pem", directory / "leaf.ext"
    ext.write_text(_LEAF_EXTENSIONS)
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", ca_key)
    _openssl(
        "req", "-x509", "-new", "-key", ca_key, "-subj", "/CN=zdlb demo CA", "-days", "30",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", ca,
    )  # fmt: skip
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
    _openssl("req", "-new", "-key", key, "-subj", "/CN=localhost", "-out", csr)
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-days", "30", "-extfile", ext, "-out", leaf,
    )  # fmt: skip
    chain = directory / "localhost.pem"
    chain.write_bytes(leaf.read_bytes() + ca.read_bytes())
    for scratch in (csr, leaf, ext, directory / "ca.srl", ca_key):
        scratch.unlink(missing_ok=True)  # the CA key too: nothing more is ever signed
    return ca, chain, key


def _openssl(*args: str | Path) -> None:
    try:
        subprocess.run(
            ["openssl", *map(str, args)],
            check=True,
            capture_output=True,
            timeout=_OPENSSL_TIMEOUT_S,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        raise CertificateError(f"openssl {args[0]} failed: {exc}") from exc


def with_https_listener(config: Config) -> Config:
    """``config`` plus the demo's ``https`` listener, or ``config`` itself (logged) when no
    certificate could be made or it has no HTTP listener to copy."""
    web = next((lst for lst in config.listeners if lst.mode is ListenerMode.HTTP), None)
    if web is None or any(lst.name == "https" for lst in config.listeners):
        return config
    directory = Path(config.source).resolve().parent / DEMO_TLS_DIR
    try:
        _, chain, key = make_demo_certificates(directory)
        certificate = inspect_pair(chain, key)
    except CertificateError as exc:
        log.warning("demo_https_skipped reason=%s", exc)
        return config
    tls = ListenerTlsConfig(
        certificates=(certificate,),
        hsts_max_age=DEMO_HSTS_MAX_AGE,
        handshake_s=web.timeouts.http_request_s,
    )
    https = dataclasses.replace(
        web, name="https", bind=DEMO_HTTPS_BIND, x_forwarded_proto="https", tls=tls
    )
    return dataclasses.replace(config, listeners=(*config.listeners, https))
