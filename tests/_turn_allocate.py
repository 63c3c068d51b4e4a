"""
Ask a TURN server for an allocation (aioice's TURN client, on asyncio, in a
process of its own): ``python _turn_allocate.py HOST PORT USERNAME PASSWORD``.
Prints ``relayed HOST PORT`` and exits 0, or ``failed REASON`` and exits 1.
"""

import asyncio
import sys

from aioice.turn import create_turn_endpoint


async def allocate(host, port, username, password):
    try:
        transport, _ = await asyncio.wait_for(
            create_turn_endpoint(
                asyncio.DatagramProtocol, (host, int(port)), username, password
            ),
            10,
        )
    except Exception as e:  # what failed is the result
        print("failed", f"{type(e).__name__}: {e}", flush=True)
        return 1
    relayed = transport.get_extra_info("sockname")
    print("relayed", *relayed, flush=True)
    transport.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(allocate(*sys.argv[1:5])))
