"""TLS config and SNI selection without sockets (issue 14): ``[listeners.NAME.tls]`` and a
backend's ``tls`` keys read with their key paths, the SNI name table's rules, a reload that
turns TLS on or off refused, expiry lines. Certificates come from the ``openssl`` command in
a temporary directory (tests/tls_certs.py)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from tests.tls_certs import CertAuthority, make_ca
from zdlb.config.diff import diff_configs
from zdlb.config.load import parse_config
from zdlb.config.model import Config, TlsVersion
from zdlb.config.tls import expiry_text
from zdlb.errors import ConfigError
from zdlb.metrics.tls import TlsCollector
from zdlb.tls.expiry import info_fields, log_expiring
from zdlb.tls.names import NameTable


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    authority = make_ca(tmp_path_factory.mktemp("ca"))
    authority.issue("a", ["a.test", "*.a.test"])
    authority.issue("b", ["b.test"])
    return authority


def config(
    ca: CertAuthority, listener_tls: dict[str, Any] | None, mode: str = "http", **backend: Any
) -> Config:
    listener: dict[str, Any] = {"bind": "127.0.0.1:0", "backend": "app", "mode": mode}
    if listener_tls is not None:
        listener["tls"] = listener_tls
    servers = [{"name": "s1", "address": "127.0.0.1:1"}]
    data = {"listeners": {"web": listener}, "backends": {"app": {"servers": servers, **backend}}}
    return parse_config(data, "t.toml", ca.directory)


def issues(
    ca: CertAuthority, listener_tls: dict[str, Any] | None, mode: str = "http", **backend: Any
) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        config(ca, listener_tls, mode, **backend)
    return [str(issue) for issue in raised.value.issues]


A = {"cert": "a.pem", "key": "a.key"}
B = {"cert": "b.pem", "key": "b.key"}


def test_defaults_and_names_read_from_the_certificates(ca: CertAuthority) -> None:
    listener = config(ca, {"certificates": [A, B]}).listeners[0]
    tls = listener.tls
    assert tls is not None
    assert [c.names for c in tls.certificates] == [("a.test", "*.a.test"), ("b.test",)]
    assert tls.min_version is TlsVersion.TLS1_2
    assert tls.alpn == ("http/1.1",)
    assert tls.session_tickets and tls.hsts_max_age is None
    assert tls.handshake_s == listener.timeouts.http_request_s
    assert listener.x_forwarded_proto == "https"  # the listener's scheme, unless set
    assert 29 * 86400 < tls.certificates[0].not_after - time.time() <= 30 * 86400


def test_key_in_the_cert_file(ca: CertAuthority, tmp_path: Path) -> None:
    both = tmp_path / "both.pem"
    both.write_bytes((ca.directory / "b.pem").read_bytes() + (ca.directory / "b.key").read_bytes())
    tls = config(ca, {"certificates": [{"cert": str(both)}]}).listeners[0].tls
    assert tls is not None and tls.certificates[0].key_file == both


@pytest.mark.parametrize(
    ("tls", "expected"),
    [
        pytest.param(
            {"certificates": [{"cert": "a.pem", "key": "b.key"}]},
            "listeners.web.tls.certificates[0]: {d}/a.pem + {d}/b.key: the key does not belong "
            "to the certificate",
            id="mismatched-pair",
        ),
        pytest.param(
            {"certificates": [{"cert": "nope.pem", "key": "a.key"}]},
            "listeners.web.tls.certificates[0].cert: file not found: {d}/nope.pem",
            id="missing-cert",
        ),
        pytest.param(
            {"certificates": [{"cert": "a.pem", "key": "nope.key"}]},
            "listeners.web.tls.certificates[0].key: file not found: {d}/nope.key",
            id="missing-key",
        ),
        pytest.param(
            {"certificates": [{"cert": "a.key", "key": "a.key"}]},
            "listeners.web.tls.certificates[0]: {d}/a.key + {d}/a.key: not a PEM certificate "
            "chain and key OpenSSL can read",
            id="key-as-cert",
        ),
        pytest.param(
            {"certificates": []},
            "listeners.web.tls.certificates: at least one certificate is needed "
            "({{cert, key}} tables)",
            id="none",
        ),
        pytest.param(
            {"certificates": [A], "min_version": "1.1"},
            "listeners.web.tls.min_version: expected one of '1.2', '1.3', got '1.1'",
            id="tls-1.1",
        ),
        pytest.param(
            {"certificates": [A], "ciphers": "NOPE"},
            "listeners.web.tls.ciphers: 'NOPE' selects no cipher suite OpenSSL knows",
            id="ciphers",
        ),
        pytest.param(
            {"certificates": [A], "alpn": ["h2", "http/1.1"]},
            "listeners.web.tls.alpn: 'h2' is not served (http listeners speak http/1.1)",
            id="h2",
        ),
        pytest.param(
            {"certificates": [A], "certificate": "x"},
            "listeners.web.tls.certificate: unknown key (did you mean 'certificates'?)",
            id="typo",
        ),
    ],
)
def test_bad_listener_tls(ca: CertAuthority, tls: dict[str, Any], expected: str) -> None:
    assert issues(ca, tls) == [expected.format(d=ca.directory)]


def test_encrypted_key_is_refused_without_a_prompt(ca: CertAuthority, tmp_path: Path) -> None:
    encrypted = tmp_path / "enc.key"
    command = ["openssl", "ec", "-in", str(ca.directory / "a.key"), "-aes128", "-passout", "pass:x"]
    subprocess.run([*command, "-out", str(encrypted)], check=True, capture_output=True)
    found = issues(ca, {"certificates": [{"cert": "a.pem", "key": str(encrypted)}]})
    assert found == [
        "listeners.web.tls.certificates[0]: the key is encrypted (zdlb takes unencrypted PEM"
        " keys only)"
    ]


def test_tcp_listener_tls(ca: CertAuthority) -> None:
    tls = config(ca, {"certificates": [A]}, mode="tcp").listeners[0].tls
    assert tls is not None and tls.alpn == ()
    assert issues(ca, {"certificates": [A], "hsts_max_age": 60}, mode="tcp") == [
        "listeners.web.tls.hsts_max_age: not used by mode = 'tcp' listeners"
    ]


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        ({"verify": False}, "backends.app.verify: only used with tls = true"),
        (
            {"tls": True, "ca_file": "nope.pem"},
            "backends.app.ca_file: file not found: {d}/nope.pem",
        ),
        ({"tls": True, "ca_file": "a.key"}, "backends.app.ca_file: {d}/a.key: no CA certificate"),
        ({"tls": True, "sni": "bad name"}, "backends.app.sni: 'bad name' is not a DNS host name"),
        ({"tls": True, "verify": False, "ca_file": "ca.pem"}, "backends.app.ca_file: not used"),
    ],
)
def test_bad_backend_tls(ca: CertAuthority, backend: dict[str, Any], expected: str) -> None:
    (found,) = issues(ca, None, **backend)
    assert found.startswith(expected.format(d=ca.directory))


def test_backend_tls_reaches_every_server(ca: CertAuthority) -> None:
    backend = config(ca, None, tls=True, ca_file="ca.pem", sni="up.test").backends[0]
    assert backend.tls is not None and backend.tls.sni == "up.test"
    assert all(server.tls is backend.tls for server in backend.servers)


def test_reload_refuses_turning_tls_on(ca: CertAuthority) -> None:
    diff = diff_configs(config(ca, None), config(ca, {"certificates": [A]}))
    assert diff.refused == (
        "listeners.web.tls: TLS is turned on or off when the listener starts; changing that "
        "needs a restart or `zdlb ctl upgrade` (certificates and settings do reload)",
    )
    renewed = diff_configs(config(ca, {"certificates": [A]}), config(ca, {"certificates": [B]}))
    assert not renewed.refused and [str(c) for c in renewed.changes] == [
        "listener web changed: tls"
    ]


@pytest.mark.parametrize(
    ("names", "picks"),
    [
        ("a.test", "a"),
        ("A.TEST.", "a"),
        ("x.a.test", "wild"),
        ("x.y.a.test", "default"),
        ("a.test.evil", "default"),
        ("b.test", "b-first"),  # the first certificate naming it
        ("", "default"),
        (None, "default"),
    ],
)
def test_name_table(names: str | None, picks: str) -> None:
    table = NameTable(
        [
            (["default.test"], "default"),
            (["*.a.test"], "wild"),
            (["a.test", "b.test"], "a"),
            (["b.test"], "b-second"),
        ]
    )
    expected = "a" if picks == "b-first" else picks
    assert table.pick(names) == expected


def test_expiry_lines_and_metric(ca: CertAuthority) -> None:
    now = time.time()
    assert expiry_text(now - 1, now).startswith("EXPIRED ")
    assert expiry_text(now + 86400 * 3, now).startswith("EXPIRING expires ")
    assert "(in 30 days)" in expiry_text(now + 86400 * 30, now)
    listeners = config(ca, {"certificates": [A, B]}).listeners
    assert info_fields(listeners, now) == {"tls_certificates": 2, "tls_expiring": "none"}
    assert info_fields(listeners, now + 20 * 86400)["tls_expiring"] == (
        "a.test,*.a.test (web) in 10.0 days; b.test (web) in 10.0 days"
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TlsCollector(lambda: listeners, clock=lambda: now))
    text = generate_latest(registry).decode()
    assert 'zdlb_tls_certificate_expiry_seconds{cert="' in text
    assert 'names="a.test,*.a.test"' in text


def test_expiring_is_logged_once_per_file(
    ca: CertAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    certificates = config(ca, {"certificates": [A, B]}).listeners[0].tls.certificates  # type: ignore[union-attr]
    now = time.time()
    assert log_expiring("web", certificates, now) == frozenset()  # 30 days left: quiet
    later = now + 20 * 86400
    warned = log_expiring("web", certificates, later)
    assert warned == {c.cert_file for c in certificates}
    assert log_expiring("web", certificates, later + 60, warned) == warned
    lines = [r.getMessage() for r in caplog.records if "tls_certificate_expiring" in r.msg]
    assert len(lines) == 2 and "names=a.test,*.a.test days_left=10.0" in lines[0]
