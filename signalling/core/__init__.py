"""
The pure core: the protocol's words and wire format, the registry contract
and the in-memory registry, and the per-connection logic. Nothing here
listens or touches a socket; only ``connection`` uses Twisted (Deferreds
and an injected clock).
"""
