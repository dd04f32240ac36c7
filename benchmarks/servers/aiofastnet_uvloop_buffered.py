"""aiofastnet on uvloop with a BufferedProtocol: the transport reads into a
buffer the protocol lends (`get_buffer`) and reports the count
(`buffer_updated`), so no `bytes` object is made per read; the echo writes a
memoryview of that buffer. This is how aiofastnet's own benchmark server
reads. One buffer serves every connection: the echo is written before the
next read, and aiofastnet copies whatever of a memoryview of a bytearray it
cannot send at once, so sharing it is safe (and keeps idle connections
small).
"""
import asyncio

import aiofastnet
import uvloop

from _asyncio_echo import serve
from _common import parse_args

SHARED = bytearray(256 * 1024)
VIEW = memoryview(SHARED)


class Echo(asyncio.BufferedProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        return SHARED

    def buffer_updated(self, nbytes):
        self.transport.write(VIEW[:nbytes])

    def connection_lost(self, exc):
        self.transport = None


if __name__ == "__main__":
    port = parse_args(__doc__).port
    with asyncio.Runner(loop_factory=aiofastnet.loop_factory(uvloop.new_event_loop)) as runner:
        runner.run(serve(Echo, port))
