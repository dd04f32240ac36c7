"""TLS echo servers for benchmarks/tls_echo.py, each written the idiomatic way for its
library with a standard ssl.SSLContext (the same certificate and defaults for all):

- iocpnet: a Session whose OnRecv calls Send, on a Listener(ssl=ctx), one worker;
- asyncio / uvloop: an asyncio Protocol whose data_received calls transport.write, from
  loop.create_server(ssl=ctx) on the standard loop or on uvloop;
- aiofastnet: the same Protocol on uvloop patched by aiofastnet (its own TLS path).
"""
import asyncio
import ssl

from _common import BACKLOG, parse_args

IMPLS = ("iocpnet-uring", "iocpnet-epoll", "asyncio", "uvloop", "aiofastnet")


def _extra(p):
    p.add_argument("--impl", choices=IMPLS, required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)


def context(args):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.cert, args.key)
    return ctx


def run_iocpnet(args):
    import iocpnet

    class EchoSession(iocpnet.Session):
        def OnRecv(self, data):
            self.Send(data)

    backend = "io_uring" if args.impl == "iocpnet-uring" else "epoll"
    core = iocpnet.IocpCore(backend=backend)
    listener = iocpnet.Listener(("127.0.0.1", args.port), backlog=BACKLOG, ssl=context(args))
    service = iocpnet.Service(core, listener, EchoSession, 100)
    print("READY", flush=True)
    service.Run(workers=1)


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


async def serve(args):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", args.port, backlog=BACKLOG,
                                      ssl=context(args))
    print("READY", flush=True)
    async with server:
        await server.serve_forever()


def main():
    args = parse_args(__doc__, _extra)
    if args.impl.startswith("iocpnet"):
        run_iocpnet(args)
    elif args.impl == "asyncio":
        asyncio.run(serve(args))
    elif args.impl == "uvloop":
        import uvloop
        uvloop.run(serve(args))
    else:
        import aiofastnet
        import uvloop
        with asyncio.Runner(loop_factory=aiofastnet.loop_factory(uvloop.new_event_loop)) as r:
            r.run(serve(args))


if __name__ == "__main__":
    main()
