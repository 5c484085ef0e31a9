"""Balancing core: server runtime state (server.py) and per-backend selection (pool.py).

Everything in this package is pure: no sockets, no clock reads, no event loop, no logging.
"""

from zdlb.balancer.pool import Backend
from zdlb.balancer.server import AdminState, Health, Server

__all__ = ["AdminState", "Backend", "Health", "Server"]
