"""HTTP/1.1 mode: head parsing (head.py), header edits (rewrite.py), upstream connections
(upstream.py) and the asyncio glue that ties a client to a server (proxy.py), with what a
listener's connections share (route.py), upgrades (tunnel.py) and long bodies (splice.py)."""
