"""What runs inside each replica: load the handler once, then serve calls.

Imports nothing from the gateway, so a container built from a function's
Dockerfile runs exactly this with ``python -m dcf.runtime``.
"""
