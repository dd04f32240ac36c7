"""The one asyncio echo Protocol and its server loop, which asyncio, uvloop and aiofastnet
run alike (written once, so that those files differ only in the loop they run on).
Apart from _common.py so that a server that does not use asyncio does not import it.
"""
import asyncio

from _common import BACKLOG


class Echo(asyncio.Protocol):
    """The echo as asyncio's documentation writes it: each read written back."""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def connection_lost(self, exc):
        # The load generator closes with RST; a reset is a normal end here.
        self.transport = None


async def serve(protocol_factory, port):
    """Listen on 127.0.0.1:port with the running loop's create_server, say READY,
    serve until killed."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(protocol_factory, "127.0.0.1", port, backlog=BACKLOG)
    print("READY", flush=True)
    async with server:
        await server.serve_forever()
