"""TLS termination and origination with Python's ``ssl``: certificate files (certs.py), the
contexts built from them (context.py), SNI selection (names.py), a listener's certificates
reloaded without re-listening (listener.py), expiry (expiry.py), and moving bytes between two
transports where the sockets cannot be spliced (relay.py)."""
