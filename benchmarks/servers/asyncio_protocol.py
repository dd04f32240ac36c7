"""asyncio echo server, Protocol/Transport API (the fast path of asyncio)."""
import asyncio

from _common import Echo, parse_args, serve


if __name__ == "__main__":
    asyncio.run(serve(Echo, parse_args(__doc__).port))
