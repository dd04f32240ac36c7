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

from _asyncio_echo import Echo, serve
from _common import parse_args


if __name__ == "__main__":
    port = parse_args(__doc__).port
    with asyncio.Runner(loop_factory=aiofastnet.loop_factory(uvloop.new_event_loop)) as runner:
        runner.run(serve(Echo, port))  # create_server is aiofastnet's on this loop
