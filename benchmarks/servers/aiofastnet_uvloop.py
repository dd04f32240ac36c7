"""aiofastnet on uvloop: asyncio's Protocol/Transport layer reimplemented in
Cython (aiofastnet), on top of the uvloop event loop.

aiofastnet is not a loop of its own: `aiofastnet.loop_factory` wraps a loop
factory (here uvloop's) so that the loop's `create_server` and friends build
aiofastnet transports on it. The protocol is a plain asyncio.Protocol, the
way its documentation writes an echo server: the transport hands each read
to `data_received`, which writes it back.
"""
import asyncio

import aiofastnet
import uvloop

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
    # the loop factory patched create_server: this is aiofastnet's
    server = await loop.create_server(Echo, "127.0.0.1", port, backlog=BACKLOG)
    print("READY", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    port = parse_args(__doc__).port
    with asyncio.Runner(loop_factory=aiofastnet.loop_factory(uvloop.new_event_loop)) as runner:
        runner.run(main(port))
