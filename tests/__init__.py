"""zdlb's test suite: unit/ (pure), net/ (real loopback sockets), daemon/ (the real process)."""
