"""uvloop echo server, Protocol/Transport API: asyncio's interface on libuv."""
import asyncio

import uvloop

from _asyncio_echo import Echo, serve
from _common import parse_args


if __name__ == "__main__":
    port = parse_args(__doc__).port
    if hasattr(uvloop, "run"):
        uvloop.run(serve(Echo, port))
    else:  # uvloop < 0.18
        uvloop.install()
        asyncio.run(serve(Echo, port))
