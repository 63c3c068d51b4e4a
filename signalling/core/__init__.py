"""
The pure core: the protocol's words and wire formats, the dialect table, the
registry contract and the in-memory registry, and the per-connection logic.
Nothing here listens or touches a socket; of Twisted it uses Deferreds, the
logger and an injected clock (docs/architecture.md).
"""
