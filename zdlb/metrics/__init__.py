"""Metrics: the Prometheus view (collector.py) of the counters the hot path bumps (zdlb/stats.py,
which lives below http/ and tcp/ so they never import this package), and the ``/metrics``
listener (endpoint.py).

Nothing is re-exported here: the proxy imports ``zdlb.stats`` alone, which must not pull in
prometheus-client or asyncio.
"""
