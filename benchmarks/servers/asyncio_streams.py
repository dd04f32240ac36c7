"""asyncio echo server, streams API (StreamReader/StreamWriter), the style most
asyncio application code is written in."""
import asyncio

from _common import BACKLOG, parse_args


async def handle(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionResetError, BrokenPipeError):
        pass  # the load generator closes with RST: a normal end here
    finally:
        writer.close()


async def main(port):
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=BACKLOG)
    print("READY", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(parse_args(__doc__).port))
