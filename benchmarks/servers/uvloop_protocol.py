"""uvloop echo server, Protocol/Transport API: asyncio's interface on libuv."""
import asyncio

import uvloop

from _common import BACKLOG, parse_args


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def connection_lost(self, exc):
        self.transport = None


async def main(port):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", port, backlog=BACKLOG)
    print("READY", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    port = parse_args(__doc__).port
    if hasattr(uvloop, "run"):
        uvloop.run(main(port))
    else:  # uvloop < 0.18
        uvloop.install()
        asyncio.run(main(port))
