"""
``signalling-bench``: a load generator for any server that speaks the
signalling protocol (``docs/protocol.md``).

- :mod:`signalling.tools.bench.wsclient`: a small, fast RFC 6455 client on asyncio.
- :mod:`signalling.tools.bench.httpclient`: a small HTTP/1.1 client on asyncio.
- :mod:`signalling.tools.bench.scenarios`: what one client process does in each
  scenario (relay, setup, idle, rooms, soak); :mod:`signalling.tools.bench.whep`
  in the WHEP ones (whep-setup, whep-latency).
- :mod:`signalling.tools.bench.runner`: the client processes, their
  synchronisation, and the server's CPU and memory from ``/proc``.
- :mod:`signalling.tools.bench.report`: percentiles, tables, comparisons.
- :mod:`signalling.tools.bench.plot`: PNG plots (needs the ``bench`` extra).
- :mod:`signalling.tools.bench.cli`: the command line.

Nothing here imports Twisted: the generator runs on asyncio, in processes of
its own, so that it never shares a core's worth of work with the server it
measures.
"""
