"""WebSocket echo server: picows on uvloop (the fast Cython WebSocket library), for
benchmarks/websocket/run.py.  Usage: picows_echo.py PORT"""
import asyncio
import sys

import uvloop
from picows import WSListener, WSMsgType, ws_create_server


class Echo(WSListener):
    def on_ws_frame(self, transport, frame):
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
        elif frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION):
            transport.send(frame.msg_type, frame.get_payload_as_memoryview(), frame.fin)


async def main(port):
    server = await ws_create_server(lambda request: Echo(), "127.0.0.1", port)
    print(f"picows echo on 127.0.0.1:{port}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
