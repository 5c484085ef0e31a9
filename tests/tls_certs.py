"""Test certificates made with the ``openssl`` command in a temporary directory: an ECDSA P-256
CA and leaf certificates it signs, with the names a test asks for. Nothing private is ever
committed; every key is generated per test session or per test.

``CertAuthority.issue`` writes ``NAME.pem`` (leaf then CA: a full chain) and ``NAME.key``;
issuing the same name again replaces both files (``os.replace``), as a renewal tool does.
"""

from __future__ import annotations

import os
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = "openssl"


def _run(*args: str | Path) -> None:
    subprocess.run([OPENSSL, *map(str, args)], check=True, capture_output=True, timeout=30)


@dataclass(frozen=True)
class CertAuthority:
    """A CA in ``directory``: ``cert`` (PEM) and its ``key``."""

    directory: Path
    cert: Path
    key: Path

    def issue(self, name: str, sans: list[str], *, days: int = 30, ca: bool = True) -> Path:
        """Issue a P-256 leaf for ``sans`` (DNS names; IP addresses as "IP:1.2.3.4"); returns
        the chain path, the key being ``NAME.key`` next to it."""
        work = self.directory / f".{name}.new"
        work.mkdir(exist_ok=True)
        key, csr, leaf, ext = (work / n for n in ("leaf.key", "leaf.csr", "leaf.pem", "ext"))
        _run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
        _run("req", "-new", "-key", key, "-subj", f"/CN={sans[0]}", "-out", csr)
        alt = ",".join(s if s.startswith("IP:") else f"DNS:{s}" for s in sans)
        ext.write_text(
            f"subjectAltName={alt}\nbasicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
        )
        _run(
            "x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key,
            "-CAcreateserial", "-days", str(days), "-extfile", ext, "-out", leaf,
        )  # fmt: skip
        chain = leaf.read_bytes() + (self.cert.read_bytes() if ca else b"")
        (work / "chain.pem").write_bytes(chain)
        target = self.directory / f"{name}.pem"
        os.replace(key, self.directory / f"{name}.key")
        os.replace(work / "chain.pem", target)
        return target

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting only this CA (hostname checked)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=self.cert)
        return context


def make_ca(directory: Path, name: str = "zdlb test CA") -> CertAuthority:
    directory.mkdir(parents=True, exist_ok=True)
    key, cert = directory / "ca.key", directory / "ca.pem"
    _run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
    _run(
        "req", "-x509", "-new", "-key", key, "-subj", f"/CN={name}", "-days", "30",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", cert,
    )  # fmt: skip
    return CertAuthority(directory, cert, key)
