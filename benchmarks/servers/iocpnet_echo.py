"""iocpnet echo server: the library under test.

Written against iocpnet's public API only, the way a user would write it.
"""
import iocpnet

from _common import parse_args


class EchoSession(iocpnet.Session):
    def OnRecv(self, data):
        # data is a RecvView of the unconsumed bytes; returning None means
        # all of it was consumed.
        self.Send(data)


def _extra(p):
    p.add_argument("--backend", choices=("io_uring", "epoll"), default="io_uring")
    p.add_argument("--workers", type=int, default=1)


def main():
    args = parse_args(__doc__, _extra)
    core = iocpnet.IocpCore(backend=args.backend)
    service = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", args.port)), EchoSession, 100)
    # Run() starts and blocks, so READY comes just before it; the harness does
    # not trust READY alone and polls the port until it echoes.
    print("READY", flush=True)
    service.Run(workers=args.workers)  # stops gracefully on SIGINT/SIGTERM


if __name__ == "__main__":
    main()
