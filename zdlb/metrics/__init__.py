"""Metrics: counters the hot path bumps (registry.py), their Prometheus view (collector.py) and
the ``/metrics`` listener (endpoint.py).

Nothing is re-exported here: the proxy imports ``zdlb.metrics.registry`` alone, which must not
pull in prometheus-client or asyncio.
"""
