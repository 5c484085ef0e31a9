"""Where an HTTP client connection stands and why its reading is paused: the values that
http/proxy.py's ``ClientConnection`` shares with the mixins it is built from (tunnel.py's
``ProtocolSwitch``, splice.py's ``BodySplicing``). Values only: no I/O, no logic.
"""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    IDLE = "idle"  # keep-alive, waiting for a request: deadline client_s
    HEAD = "head"  # a request head is arriving: deadline http_request_s
    EXCHANGE = "exchange"  # a request is being forwarded or answered: deadline server_s
    CLOSING = "closing"  # the last answer is written; the connection closes after it
    TUNNEL = "tunnel"  # switched protocols: a Pump owns both sockets; idle deadline tunnel_s


# Why reading from the client is paused (bits of one int); reading resumes when none is left.
# Plain ints, not an IntFlag: enum arithmetic cost ~1.5 us per request in cProfile.
PAUSED_UPSTREAM_FULL = 1  # the server's socket buffer is full
PAUSED_CONNECTING = 2  # too many request bytes held while the server connection opens
PAUSED_BACKLOG = 4  # too many pipelined requests queued
PAUSED_UPGRADE = 8  # an upgrade request awaits its answer: what follows may not be HTTP
PAUSED_SPLICE = 16  # a response body is being spliced to the client (splice.py)
PAUSED_REQUEST_SPLICE = 32  # the request body is (about to be) spliced to the server
