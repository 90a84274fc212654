"""Cluster: planner, nodes, gateway client, membership, routing, recovery."""
