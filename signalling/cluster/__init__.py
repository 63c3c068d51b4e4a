"""
The cluster: every server process that points at one Redis is one logical
signalling server (``--redis``). :mod:`signalling.cluster.scripts` holds the
Lua that decides every command atomically inside Redis,
:mod:`signalling.cluster.channel` the format of what Redis tells a node,
:mod:`signalling.cluster.backend` the node's registry backend (its own
peers in :mod:`signalling.cluster.peers`, its probes of other nodes' peers
in :mod:`signalling.cluster.probes`), and :mod:`signalling.cluster.redis`
the node's two connections to Redis.
"""
