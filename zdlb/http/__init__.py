"""HTTP/1.1 mode. Bytes enter through the readers (stream.py, with head.py validating heads and
chunked.py decoding bodies), one exchange's decisions are pure (exchange.py), header edits too
(rewrite.py); connection.py is the asyncio glue that applies them to a client connection and an
upstream connection (upstream.py). A listener's connections share route.py; upgrades
(upgrade.py) and long bodies (splice.py) are detours the connection hands its sockets to."""
