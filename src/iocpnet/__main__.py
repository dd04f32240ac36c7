"""Command line: ``python -m iocpnet {echo,demo,dummy-client} ...``.

- ``echo``: the C++ original's echo server, until Ctrl-C or SIGTERM.  With
  ``--processes N``, N server processes share the port (SO_REUSEPORT; the kernel
  spreads connections over them) under a parent that restarts one that dies and stops
  them all on Ctrl-C or SIGTERM.  Echo has no rooms; a server with rooms runs the same
  way, one process per core on one port, with its rooms shared through Redis: for the
  chat example, in each of N shells (or under a supervisor)
  ``python examples/chat_server.py --port 11022 --reuse-port --redis
  redis://127.0.0.1:6379`` (README: "Scaling out").
- ``demo``: an echo server and dummy clients in one process, live figures once a
  second, a summary at the end (the newcomer's first command).
- ``dummy-client``: dummy clients that load an echo server, the chat example server
  (``--protocol chat``) or the game example server (``--protocol game``), check every
  answer, show live figures and a summary, and exit non-zero on any error.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from types import FrameType
from typing import Dict, List, Optional, Sequence

import iocpnet
from iocpnet._load import PROTOCOLS, LoadRun, Progress, Stats, summarize

log = logging.getLogger("iocpnet.cli")


class EchoSession(iocpnet.Session):
    """The original's GameSession: send back whatever arrives."""

    def OnRecv(self, data: iocpnet.RecvView) -> Optional[int]:
        self.Send(data)
        return None


class WsEchoSession(iocpnet.WebSocketSession):
    """The echo server over WebSocket: each message back, with its type."""

    def OnMessage(self, data: object, binary: bool) -> None:
        self.SendMessage(data)  # type: ignore[arg-type]


def _print(*args: object) -> None:
    # One write per line, newline included: print() writes the text and the newline
    # separately, and the processes of `--processes N` share one stderr, so two of them
    # starting together printed "...to stopiocpnet echo server..." on one line.
    sys.stderr.write(" ".join(map(str, args)) + "\n")
    sys.stderr.flush()


# ---- echo ----

def cmd_echo(args: argparse.Namespace) -> int:
    if args.processes > 1:
        return _supervise(args)
    # Signals only set a flag, from the very start: a SIGTERM that comes while the
    # server is still starting stops it cleanly too (Service.Run would install its
    # handlers only once running, and the line below tells scripts we are ready).
    stop = threading.Event()

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        log.info("%s received; shutting down", signal.Signals(signum).name)
        stop.set()

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        core = iocpnet.IocpCore(args.backend)
        ctx = _server_tls(args)
        listener = iocpnet.Listener((args.host, args.port), reuse_port=args.reuse_port,
                                    ssl=ctx)
        session_cls = WsEchoSession if args.websocket else EchoSession
        service = iocpnet.Service(core, listener, session_cls, args.accepts)
        service.Start()
        workers = _start_workers(core, args.workers)
        pid = os.getpid()
        kind = "WebSocket echo server" if args.websocket else "echo server"
        if ctx is not None:
            kind += " (wss)" if args.websocket else " (TLS)"
        _print(f"iocpnet {kind} on {listener.address[0]}:{listener.port} "
               f"({core.backend}, {args.workers} workers, pid {pid}); Ctrl-C to stop")
        if args.parent_pid:
            _watch_parent(args.parent_pid, stop)
        while not stop.wait(0.25):
            pass
        service.Stop(args.shutdown_timeout)
        core.Close(args.shutdown_timeout)
        for t in workers:
            t.join(args.shutdown_timeout)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    _print(f"pid {pid}: stopped after {service.total_sessions} sessions")
    return 0


def _server_tls(args: argparse.Namespace) -> Optional[ssl.SSLContext]:
    """--tls-cert/--tls-key: a server context (TLS, or wss with --websocket)."""
    if not args.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as e:     # SSLError is an OSError: one line, exit 2
        raise OSError(f"cannot load the TLS certificate {args.tls_cert} with the key "
                      f"{args.tls_key}: {e}") from e
    return ctx


def _client_tls(args: argparse.Namespace) -> Optional[ssl.SSLContext]:
    """--tls [--tls-ca FILE]: a client context that verifies the server."""
    if not getattr(args, "tls", False):
        return None
    return ssl.create_default_context(cafile=args.tls_ca)


def _watch_parent(parent: int, stop: threading.Event) -> None:
    """A child of ``--processes``: stop if the parent is gone (killed without a chance
    to stop us), instead of serving on as an orphan."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        log.warning("the supervising process %d is gone; stopping", parent)
        stop.set()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) a SO_REUSEPORT socket: it makes --port 0 pick one port
    for every child, and keeps the port ours while children restart.  A socket that
    does not listen never receives a connection."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    return s


def _supervise(args: argparse.Namespace) -> int:
    if not hasattr(socket, "SO_REUSEPORT"):
        _print("iocpnet: --processes needs SO_REUSEPORT, which this platform lacks")
        return 2
    try:
        reserved = _reserve_port(args.host, args.port)
    except OSError as e:
        _print(f"iocpnet: cannot use port {args.port} on {args.host}: {e}")
        return 2
    port = reserved.getsockname()[1]
    try:
        _server_tls(args)       # a bad certificate fails here once, not in each child
    except OSError:
        reserved.close()
        raise
    child_argv = [sys.executable, "-m", "iocpnet"]
    if args.backend:
        child_argv += ["--backend", args.backend]
    if args.verbose:
        child_argv.append("-v")
    child_argv += ["echo", "--host", args.host, "--port", str(port),
                   "--workers", str(args.workers), "--accepts", str(args.accepts),
                   "--reuse-port", "--parent-pid", str(os.getpid())]
    if args.websocket:
        child_argv.append("--websocket")
    if args.tls_cert:
        child_argv += ["--tls-cert", args.tls_cert, "--tls-key", args.tls_key]

    stop = threading.Event()

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        stop.set()

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def spawn() -> subprocess.Popen[bytes]:
        # A session of its own: a terminal's Ctrl-C reaches only this parent, which
        # then stops the children in order (and they are not hit twice).
        return subprocess.Popen(child_argv, stdin=subprocess.DEVNULL,
                                start_new_session=True)

    children: Dict[int, subprocess.Popen[bytes]] = {}
    restarts: List[float] = []
    status = 0
    try:
        for i in range(args.processes):
            children[i] = spawn()
        _print(f"iocpnet echo: {args.processes} processes sharing {args.host}:{port} "
               f"(SO_REUSEPORT), pids {' '.join(str(c.pid) for c in children.values())}; "
               f"Ctrl-C to stop")
        while not stop.wait(0.2):
            for i, child in list(children.items()):
                code = child.poll()
                if code is None:
                    continue
                if code == 2:
                    # The child refused its arguments or setup (it said why): a restart
                    # would only fail again.
                    _print(f"iocpnet echo: process {child.pid} exited (2); not "
                           f"restarting, stopping")
                    status = 2
                    stop.set()
                    break
                now = time.monotonic()
                restarts[:] = [t for t in restarts if now - t < 10.0]
                if len(restarts) >= 5:
                    _print(f"iocpnet echo: process {child.pid} exited ({code}); "
                           f"too many restarts in 10 s, stopping")
                    status = 1
                    stop.set()
                    break
                restarts.append(now)
                children[i] = spawn()
                _print(f"iocpnet echo: process {child.pid} exited ({code}); "
                       f"restarted as {children[i].pid}")
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + args.shutdown_timeout + 5.0
        for child in children.values():
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _print(f"iocpnet echo: process {child.pid} did not stop; killing it")
                child.kill()
                child.wait()
                status = 1
        reserved.close()
    _print(f"iocpnet echo: all {len(children)} processes stopped")
    return status


# ---- load: demo and dummy-client ----

def _load(core: iocpnet.IocpCore, address: tuple[str, int], args: argparse.Namespace,
          server: Optional[iocpnet.Service] = None) -> Stats:
    run = LoadRun(core, address, args.clients, args.size,
                  protocol=getattr(args, "protocol", "echo"),
                  room_size=getattr(args, "room_size", 10),
                  websocket=getattr(args, "websocket", False), ssl=_client_tls(args))
    progress = Progress(args.seconds, sys.stdout,
                        (lambda: server.session_count) if server is not None else None)
    try:
        total, elapsed = run.run(args.seconds, progress, interval=args.interval,
                                 grace=getattr(args, "grace", 3.0))
    finally:
        progress.done()
    summarize(total, elapsed, run, sys.stdout)
    return total


def _start_workers(core: iocpnet.IocpCore, n: int) -> List[threading.Thread]:
    def work() -> None:
        while core.Dispatch() >= 0:
            pass

    threads = [threading.Thread(target=work, name=f"iocpnet-worker-{i}", daemon=True)
               for i in range(n)]
    for t in threads:
        t.start()
    return threads


def _ok(total: Stats) -> int:
    return 0 if not total.errors and total.messages > 0 else 1


def cmd_demo(args: argparse.Namespace) -> int:
    core = iocpnet.IocpCore(args.backend)
    server = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), EchoSession,
                             max(16, min(args.clients, 1000)))
    server.Start()
    workers = _start_workers(core, args.workers)
    print(f"iocpnet demo: echo server on 127.0.0.1:{server.listener.port} "
          f"({core.backend} backend, {args.workers} worker threads), "
          f"{args.clients} dummy clients for {args.seconds:g} s", flush=True)
    try:
        total = _load(core, ("127.0.0.1", server.listener.port), args, server)
    finally:
        server.Stop(5.0)
        core.Close(5.0)
        for t in workers:
            t.join(5.0)
    return _ok(total)


def cmd_dummy_client(args: argparse.Namespace) -> int:
    core = iocpnet.IocpCore(args.backend)
    workers = _start_workers(core, args.workers)
    over = " over WebSocket" if args.websocket else ""
    print(f"iocpnet dummy-client: {args.clients} {args.protocol} clients{over} -> "
          f"{args.host}:{args.port}, {args.size} B messages, {args.seconds:g} s "
          f"({core.backend})", flush=True)
    try:
        total = _load(core, (args.host, args.port), args)
    finally:
        core.Close(5.0)
        for t in workers:
            t.join(5.0)
    return _ok(total)


# ---- the parser ----

def build_parser() -> argparse.ArgumentParser:
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
    e.add_argument("--port", type=int, default=11021, help="0: any free port")
    e.add_argument("--workers", type=int, default=5)
    e.add_argument("--accepts", type=int, default=100,
                   help="accepts kept posted (Service's accepts=, the original's "
                        "maxSessionCount)")
    e.add_argument("--processes", type=int, default=1,
                   help="run N server processes sharing the port (SO_REUSEPORT); "
                        "rooms of a server with rooms span processes through Redis: "
                        "examples/chat_server.py --reuse-port --redis URL in each")
    e.add_argument("--reuse-port", action="store_true",
                   help="SO_REUSEPORT: let several processes share the port")
    e.add_argument("--websocket", action="store_true",
                   help="a WebSocket echo server: each message back with its type")
    e.add_argument("--tls-cert", metavar="FILE",
                   help="serve TLS (wss with --websocket) with this certificate (PEM)")
    e.add_argument("--tls-key", metavar="FILE", help="the certificate's private key")
    e.add_argument("--shutdown-timeout", type=float, default=5.0, help=argparse.SUPPRESS)
    e.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    e.set_defaults(func=cmd_echo)

    d = sub.add_parser("demo", help="echo server + dummy clients in one process")
    d.add_argument("--clients", type=int, default=100)
    d.add_argument("--seconds", type=float, default=5.0)
    d.add_argument("--size", type=int, default=64, help="message size in bytes")
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--interval", type=float, default=1.0,
                   help="seconds between figures")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("dummy-client", help="load a server with checking dummy clients")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, default=11021)
    c.add_argument("--clients", type=int, default=100)
    c.add_argument("--seconds", type=float, default=5.0)
    c.add_argument("--size", type=int, default=64, help="message size in bytes")
    c.add_argument("--protocol", choices=PROTOCOLS, default="echo",
                   help="echo: any echo server; chat: examples/chat_server.py "
                        "(with --say-rate 0: it limits what a client says); "
                        "game: examples/game_server.py")
    c.add_argument("--room-size", type=int, default=10,
                   help="chat and game: clients per room")
    c.add_argument("--websocket", action="store_true",
                   help="connect over WebSocket (ws://HOST:PORT/): echo sends binary "
                        "messages, chat sends its packets in binary messages")
    c.add_argument("--tls", action="store_true",
                   help="connect with TLS (wss:// with --websocket), verifying the server")
    c.add_argument("--tls-ca", metavar="FILE",
                   help="with --tls: trust this CA (PEM) instead of the system's")
    c.add_argument("--workers", type=int, default=2)
    c.add_argument("--interval", type=float, default=1.0,
                   help="seconds between figures")
    c.add_argument("--grace", type=float, default=3.0,
                   help="seconds each client may wait for its last answer at the end "
                        "(no answer by then is an error)")
    c.set_defaults(func=cmd_dummy_client)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if bool(getattr(args, "tls_cert", None)) != bool(getattr(args, "tls_key", None)):
        parser.error("--tls-cert and --tls-key go together")
    for name in ("clients", "seconds", "size", "workers", "interval", "room_size",
                 "processes", "accepts", "grace"):
        # Written so that NaN is refused too (nan <= 0 is false: `--seconds nan` ran
        # forever).
        if not getattr(args, name, 1) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if not getattr(args, "shutdown_timeout", 0) >= 0:
        parser.error("--shutdown-timeout must be a number of seconds >= 0")
    try:
        return int(args.func(args))
    except iocpnet.BackendUnavailableError as e:
        _print(f"iocpnet: {e}")
        return 2
    except (OSError, ValueError) as e:
        # A port in use, a name that does not resolve, a size the protocol refuses:
        # say it in one line, not a traceback.
        _print(f"iocpnet: {e}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
