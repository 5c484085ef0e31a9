"""``zdlb_tls_certificate_expiry_seconds``: how long each TLS listener's certificates have
left, read from the files as they are at scrape time (tls/expiry.py), so a renewal shows at
the next scrape. Alert on it below 14 days (zdlb logs a warning then, too)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from zdlb.config.model import ListenerConfig
from zdlb.tls.expiry import ExpiryReader

ListenerSource = Callable[[], Iterable[ListenerConfig]]


class TlsCollector:
    """One gauge series per certificate of every TLS listener the source returns."""

    def __init__(self, listeners: ListenerSource, clock: Callable[[], float] = time.time):
        self._listeners = listeners
        self._clock = clock
        self._reader = ExpiryReader()

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "zdlb_tls_certificate_expiry_seconds",
            "Seconds until the certificate expires (negative: expired).",
            labels=["listener", "cert", "names"],
        )
        now = self._clock()
        for cert in self._reader.read(self._listeners()):
            labels = [cert.listener, str(cert.cert_file), ",".join(cert.names)]
            gauge.add_metric(labels, cert.left_s(now))
        yield gauge
