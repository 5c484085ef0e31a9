"""zdlb: a zero-downtime HTTP/1.1 and TCP load balancer on asyncio + uvloop."""

__version__ = "0.1.0"
