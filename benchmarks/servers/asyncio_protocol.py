"""asyncio echo server, Protocol/Transport API (the fast path of asyncio)."""
import asyncio

from _asyncio_echo import Echo, serve
from _common import parse_args


if __name__ == "__main__":
    asyncio.run(serve(Echo, parse_args(__doc__).port))
