"""WebSocket echo server: the websockets library (asyncio API) on uvloop, for
benchmarks/websocket/run.py.  Usage: websockets_echo.py PORT"""
import asyncio
import sys

import uvloop
from websockets.asyncio.server import serve


async def echo(ws):
    async for message in ws:
        await ws.send(message)


async def main(port):
    async with serve(echo, "127.0.0.1", port, compression=None, max_size=None,
                     ping_interval=None):
        print(f"websockets echo on 127.0.0.1:{port}", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
