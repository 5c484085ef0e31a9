"""TCP plumbing: listening sockets (listener.py); the splice pump arrives with TCP mode."""
