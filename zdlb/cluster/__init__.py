"""A fleet of zdlb instances sharing runtime state through etcd (issue 16): state.py
(the keys, pure), etcd.py (the client), fleet.py (join, write-through, watch, views)."""
