"""asyncio echo server, Protocol/Transport API (the fast path of asyncio)."""
import asyncio

from _common import BACKLOG, parse_args


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def connection_lost(self, exc):
        # The load generator closes with RST; a reset is a normal end here.
        self.transport = None


async def main(port):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", port, backlog=BACKLOG)
    print("READY", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(parse_args(__doc__).port))
