"""Routing calls to replicas: the data plane's door and the pool behind it."""
