"""
``signalling-bench``: a load generator for any server that speaks the
signalling protocol (``/work/shared/PROTOCOL.md``, ``docs/protocol.md``).

- :mod:`signalling.bench.wsclient`: a small, fast RFC 6455 client on asyncio.
- :mod:`signalling.bench.scenarios`: what one client process does in each
  scenario (relay, setup, idle, rooms).
- :mod:`signalling.bench.runner`: the client processes, their
  synchronisation, and the server's CPU and memory from ``/proc``.
- :mod:`signalling.bench.report`: percentiles, tables, comparisons.
- :mod:`signalling.bench.plot`: PNG plots (needs the ``bench`` extra).
- :mod:`signalling.bench.cli`: the command line.

Nothing here imports Twisted: the generator runs on asyncio, in processes of
its own, so that it never shares a core's worth of work with the server it
measures.
"""
