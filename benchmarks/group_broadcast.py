"""Group broadcast: 64-byte messages fanned out to 1,000 members.

    python benchmarks/group_broadcast.py [--members 1000] [--seconds 5] [--rounds 3]
        [--servers iocpnet,asyncio,uvloop] [--backend io_uring]

What is measured.  A server holds `members` connections in one room.  A publisher
connection streams 64-byte messages; the server cuts them and sends each one to every
member (iocpnet: ``Group.Broadcast`` of one ``bytes`` object from ``OnRecv``; asyncio and
uvloop: ``transport.write`` of the same ``bytes`` to each member's transport, the way one
writes a fan-out on them).  The driver reads every member's socket and counts what
arrived; it keeps at most `window` messages per member in flight, so the server is
never asked to queue without bound.

Cells: messages delivered per second (64 B each, to one member: a broadcast to 1,000
members is 1,000 deliveries), and per CPU-second of the server process (its user +
system time over the measured window, from /proc).  The server is pinned to core 0
and the driver to core 1 (``taskset``); the driver's own CPU share is printed: near
100 % means the driver, not the server, was the limit.  Servers take turns, round after
round (interleaved), so a change in the machine's load touches them all.

Run it only on a quiet machine (``cat /proc/loadavg`` below ~0.7).
"""
from __future__ import annotations

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from _common import MSG, cpu_seconds, free_port, serve_room



# ---- the servers (run as `group_broadcast.py --serve KIND --port P`) ----

def serve_asyncio(port: int, use_uvloop: bool) -> None:
    import asyncio

    members: List[Any] = []

    class Conn(asyncio.Protocol):
        def __init__(self) -> None:
            self.role = b""
            self.buf = b""
            self.transport: Any = None

        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            transport.get_extra_info("socket").setsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def data_received(self, data: bytes) -> None:
            if not self.role:
                self.role = data[:1]
                data = data[1:]
                if self.role == b"M":
                    members.append(self.transport)
                self.transport.write(b"!")
            buf = self.buf + data
            n = len(buf) - len(buf) % MSG
            for off in range(0, n, MSG):
                msg = buf[off:off + MSG]
                for t in members:
                    t.write(msg)
            self.buf = buf[n:]

        def connection_lost(self, exc: Optional[BaseException]) -> None:
            if self.transport in members:
                members.remove(self.transport)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Conn, "127.0.0.1", port, backlog=2048)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    if use_uvloop:
        import uvloop
        uvloop.install()
    asyncio.run(main())


# ---- the driver ----

def run_cell(kind: str, members: int, seconds: float, window: int,
             backend: Optional[str]) -> Dict[str, Any]:
    port = free_port()
    argv = ["taskset", "-c", "0", sys.executable, os.path.abspath(__file__),
            "--serve", kind, "--port", str(port)]
    if backend:
        argv += ["--backend", backend]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=env, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the {kind} server did not start")
        return _drive(proc.pid, port, members, seconds, window) | {"server": kind}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _drive(pid: int, port: int, members: int, seconds: float,
           window: int) -> Dict[str, Any]:
    socks = []
    for _ in range(members):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 18)
        s.sendall(b"M")
        socks.append(s)
    for s in socks:
        if s.recv(1) != b"!":
            raise RuntimeError("a member was not acknowledged")
    pub = socket.create_connection(("127.0.0.1", port))
    pub.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pub.sendall(b"P")
    assert pub.recv(1) == b"!"
    for s in socks:
        s.setblocking(False)
    pub.setblocking(False)
    ep = select.epoll()
    fds = {}
    for s in socks:
        ep.register(s.fileno(), select.EPOLLIN)
        fds[s.fileno()] = s
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    payload = bytes(range(MSG)) * 64          # 64 messages per send
    published = 0
    received = 0                               # bytes, all members
    pending_pub = b""
    t_start = time.perf_counter()
    warm_until = t_start + 1.0
    end = warm_until + seconds
    mark: Optional[Dict[str, float]] = None
    self_cpu0 = 0.0
    while True:
        now = time.perf_counter()
        if mark is None and now >= warm_until:
            mark = {"t": now, "received": received, "cpu": cpu_seconds(pid)}
            self_cpu0 = time.process_time()
        if now >= end:
            break
        # Publish while fewer than `window` messages per member are in flight.
        in_flight = published - received // (MSG * members)
        if not pending_pub and in_flight < window:
            pending_pub = payload[:MSG * min(64, window - in_flight)]
        if pending_pub:
            try:
                n = pub.send(pending_pub)
                published += n // MSG          # whole messages (64 B, never split here)
                pending_pub = pending_pub[n:]
                if len(pending_pub) % MSG:
                    raise RuntimeError("a partial message was sent")
            except BlockingIOError:
                pass
        for fd, _ in ep.poll(0.001 if pending_pub or in_flight >= window else 0):
            s = fds[fd]
            while True:
                try:
                    n = s.recv_into(view)
                except BlockingIOError:
                    break
                if n == 0:
                    raise RuntimeError("the server closed a member")
                received += n
                if n < len(buf):
                    break
    assert mark is not None
    t1 = time.perf_counter()
    cpu = cpu_seconds(pid) - mark["cpu"]
    delivered = (received - mark["received"]) / MSG
    dt = t1 - mark["t"]
    driver_cpu = (time.process_time() - self_cpu0) / dt
    for s in socks:
        s.close()
    pub.close()
    ep.close()
    return {
        "members": members,
        "delivered_per_s": delivered / dt,
        "delivered_per_cpu_s": delivered / cpu if cpu > 0 else float("nan"),
        "server_cpu_share": cpu / dt,
        "driver_cpu_share": driver_cpu,
        "seconds": dt,
    }


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", choices=("iocpnet", "asyncio", "uvloop"))
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--backend", default=None)
    p.add_argument("--members", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--window", type=int, default=256,
                   help="messages per member in flight at most")
    p.add_argument("--servers", default="iocpnet,asyncio,uvloop")
    p.add_argument("--json", default=None, help="write the cells to this file")
    args = p.parse_args(argv)
    if args.serve == "iocpnet":
        serve_room(args.port, args.backend)
        return 0
    if args.serve in ("asyncio", "uvloop"):
        serve_asyncio(args.port, args.serve == "uvloop")
        return 0
    print(f"load average: {open('/proc/loadavg').read().split()[:3]}", file=sys.stderr)
    kinds = args.servers.split(",")
    cells: List[Dict[str, Any]] = []
    for r in range(args.rounds):
        for kind in kinds:
            cell = run_cell(kind, args.members, args.seconds, args.window, args.backend)
            cell["round"] = r
            cells.append(cell)
            print(f"round {r} {kind:8s} {cell['delivered_per_s']:>12,.0f} msg/s  "
                  f"{cell['delivered_per_cpu_s']:>12,.0f} msg/CPU-s  "
                  f"server CPU {cell['server_cpu_share']:.0%}  "
                  f"driver CPU {cell['driver_cpu_share']:.0%}", flush=True)
    print("\nbest of each (messages of 64 B delivered to one member):")
    for kind in kinds:
        mine = [c for c in cells if c["server"] == kind]
        best = max(mine, key=lambda c: c["delivered_per_s"])
        print(f"  {kind:8s} {best['delivered_per_s']:>12,.0f} /s   "
              f"{max(c['delivered_per_cpu_s'] for c in mine):>12,.0f} /CPU-s   "
              f"(server CPU {best['server_cpu_share']:.0%}, driver CPU "
              f"{best['driver_cpu_share']:.0%})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"loadavg": open("/proc/loadavg").read().split()[:3],
                       "cells": cells}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
