"""The cluster: nodes sharing the shards through fenced leases (shards.py), and the routing of
offers, forgets and fired tasks to the node that should have them (routing.py)."""
