"""Command line: ``python -m iocpnet {echo,demo,dummy-client} ...``.

- ``echo``: the C++ original's echo server, until Ctrl-C.
- ``demo``: an echo server and dummy clients in one process, live figures once a
  second, a summary at the end (the newcomer's first command).
- ``dummy-client``: dummy clients that load any echo server, with live figures.
"""
import argparse
import logging
import sys
import threading
import time

import iocpnet
from iocpnet._load import LoadRun, format_ms, format_rate


class EchoSession(iocpnet.Session):
    """The original's GameSession: send back whatever arrives."""

    def OnRecv(self, data):
        self.Send(data)


def _print(*args, **kw):
    print(*args, **kw, flush=True)


def cmd_echo(args):
    core = iocpnet.IocpCore(args.backend)
    listener = iocpnet.Listener((args.host, args.port), reuse_port=args.reuse_port)
    service = iocpnet.Service(core, listener, EchoSession, args.accepts)
    service.Start()
    _print(f"iocpnet echo server on {listener.address[0]}:{listener.port} "
           f"({core.backend}, {args.workers} workers); Ctrl-C to stop", file=sys.stderr)
    service.Run(workers=args.workers)
    _print(f"stopped after {service.total_sessions} sessions", file=sys.stderr)
    return 0


def _run_load(core, address, args, server=None):
    run = LoadRun(core, address, args.clients, args.size)

    def tick(t, msgs, nbytes):
        sessions = server.session_count if server is not None else run.service.session_count
        _print(f"[{t:5.1f}s] sessions {sessions:5d} | {format_rate(msgs):>10} msg/s | "
               f"{nbytes / 1e6:8.2f} MB/s")

    total, elapsed = run.run(args.seconds, tick)
    p50 = total.hist.percentile(50)
    p99 = total.hist.percentile(99)
    _print("-" * 72)
    _print(f"summary: {args.clients} clients x {args.size} B messages for {elapsed:.1f} s "
           f"({core.backend})")
    _print(f"  messages  {total.messages:,} echoed and checked "
           f"({format_rate(total.messages / elapsed)} msg/s)")
    _print(f"  bytes     {total.bytes / 1e6:,.1f} MB each way "
           f"({total.bytes / elapsed / 1e6:.2f} MB/s)")
    _print(f"  latency   p50 {format_ms(p50)}, p99 {format_ms(p99)}, "
           f"max {format_ms(total.hist.max if total.hist.total else None)}")
    _print(f"  errors    {len(total.errors)}")
    for e in total.errors[:10]:
        _print(f"    {e}")
    return total


def cmd_demo(args):
    core = iocpnet.IocpCore(args.backend)
    server = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), EchoSession,
                             max(16, min(args.clients, 1000)))
    server.Start()
    workers = [threading.Thread(target=_worker, args=(core,), name=f"iocpnet-worker-{i}",
                                daemon=True) for i in range(args.workers)]
    for t in workers:
        t.start()
    _print(f"iocpnet demo: echo server on 127.0.0.1:{server.listener.port} "
           f"({core.backend} backend, {args.workers} worker threads), "
           f"{args.clients} dummy clients for {args.seconds:g} s")
    try:
        total = _run_load(core, ("127.0.0.1", server.listener.port), args, server)
    finally:
        server.Stop(5.0)
        core.Close(5.0)
        for t in workers:
            t.join(5.0)
    ok = not total.errors and total.messages > 0
    return 0 if ok else 1


def cmd_dummy_client(args):
    core = iocpnet.IocpCore(args.backend)
    workers = [threading.Thread(target=_worker, args=(core,), daemon=True)
               for _ in range(args.workers)]
    for t in workers:
        t.start()
    _print(f"iocpnet dummy-client: {args.clients} clients -> {args.host}:{args.port}, "
           f"{args.size} B messages, {args.seconds:g} s ({core.backend})")
    try:
        total = _run_load(core, (args.host, args.port), args)
    finally:
        core.Close(5.0)
        for t in workers:
            t.join(5.0)
    return 0 if not total.errors and total.messages > 0 else 1


def _worker(core):
    while core.Dispatch() >= 0:
        pass


def build_parser():
    p = argparse.ArgumentParser(prog="python -m iocpnet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"iocpnet {iocpnet.__version__}")
    p.add_argument("--backend", default=None,
                   help="io_uring, epoll or iocp (default: the best available, or "
                        "$IOCPNET_BACKEND)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("echo", help="run the echo server until Ctrl-C")
    e.add_argument("--host", default="0.0.0.0")
    e.add_argument("--port", type=int, default=11021)
    e.add_argument("--workers", type=int, default=5)
    e.add_argument("--accepts", type=int, default=100,
                   help="accepts kept posted (the original's max_session_count)")
    e.add_argument("--reuse-port", action="store_true",
                   help="SO_REUSEPORT: let several processes share the port")
    e.set_defaults(func=cmd_echo)

    d = sub.add_parser("demo", help="echo server + dummy clients in one process")
    d.add_argument("--clients", type=int, default=100)
    d.add_argument("--seconds", type=float, default=5.0)
    d.add_argument("--size", type=int, default=64, help="message size in bytes")
    d.add_argument("--workers", type=int, default=2)
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("dummy-client", help="load an echo server with dummy clients")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, default=11021)
    c.add_argument("--clients", type=int, default=100)
    c.add_argument("--seconds", type=float, default=5.0)
    c.add_argument("--size", type=int, default=64, help="message size in bytes")
    c.add_argument("--workers", type=int, default=2)
    c.set_defaults(func=cmd_dummy_client)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for name in ("clients", "seconds", "size", "workers"):
        if getattr(args, name, 1) <= 0:
            build_parser().error(f"--{name} must be positive")
    try:
        return args.func(args)
    except iocpnet.BackendUnavailableError as e:
        print(f"iocpnet: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
