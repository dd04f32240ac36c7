"""Shared bits of the Python echo servers: argument parsing, descriptor limits, and the
one asyncio echo Protocol with its server loop, which asyncio, uvloop and aiofastnet
run alike (written once, so that those three files differ only in the loop they run on).

Kept tiny on purpose: every server file should read as the idiomatic way to
write an echo server with its library, nothing more.
"""
import argparse
import asyncio
import resource


def parse_args(description, extra=None):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("port", type=int, help="listen on 127.0.0.1:PORT")
    if extra:
        extra(p)
    args = p.parse_args()
    # The idle benchmark holds 10,000 connections; the soft limit may be lower
    # than that on other machines, and raising it is what a real server would do.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return args


# Same backlog as the C servers, so no server is slower to accept a burst
# merely because of a smaller accept queue.
BACKLOG = 1024


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
