"""A room shared through Redis: 64-byte messages fanned out to 2 servers x 500 members.

    python benchmarks/redis_fanout.py [--members 500] [--seconds 5] [--rounds 3]
        [--rate 200] [--backend io_uring]

What is measured, in two cells taken in turns (interleaved, round after round):

- ``local``: one iocpnet server, ``2 * members`` members in one plain ``Group``; a
  publisher connection streams 64-byte messages and the server broadcasts each one
  from ``OnRecv`` (``Group.Broadcast``).
- ``redis``: two iocpnet server processes, ``members`` members each, one ``Group``
  shared through a ``RedisBackplane`` on a redis-server of the benchmark's own; the
  publisher is a connection to server A.  Each message goes A -> PUBLISH -> Redis ->
  both servers' subscriber connections -> their members.

For each cell: messages delivered per second to the members (a message reaching 1,000
members is 1,000 deliveries) with the publisher kept at most ``window`` messages ahead
of the slowest count, and the latency from the publisher's send to a member's receipt
(p50 and p99, at ``rate`` messages per second, read from 10 sampled members; the
other members are drained and counted).  The added latency of Redis is the difference
between the cells.  Each process's CPU share is printed (servers, redis-server, the
driver): the one near 100 % is what limited the cell.

Placement (2 cores): the driver on core 1; the servers and redis-server share core 0,
so both cells have one core of server-side work to spend.  Run it only on a quiet
machine (``cat /proc/loadavg`` below ~0.7).
"""
from __future__ import annotations

import argparse
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

from _common import MSG, cpu_seconds, free_port, serve_room

STAMP = struct.Struct("<Q")


# The server (`redis_fanout.py --serve --port P [--redis URL]`) is _common.serve_room.

# ---- the driver ----

def _start(argv: List[str], ready: Optional[str] = "ready") -> "subprocess.Popen[Any]":
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), text=True)
    if ready is not None:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != ready:
            proc.kill()
            raise RuntimeError(f"{argv} did not start")
    return proc


def _stop(proc: "subprocess.Popen[Any]") -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _redis(workdir: str) -> Tuple["subprocess.Popen[Any]", int]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        ["taskset", "-c", "0", exe, "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("redis-server would not start")
            time.sleep(0.05)


def run_cell(kind: str, members: int, seconds: float, window: int, rate: float,
             backend: Optional[str], workdir: str) -> Dict[str, Any]:
    procs: Dict[str, "subprocess.Popen[Any]"] = {}
    try:
        url = None
        if kind == "redis":
            procs["redis-server"], rport = _redis(workdir)
            url = f"redis://127.0.0.1:{rport}/0"
        ports = []
        for name in (["A", "B"] if kind == "redis" else ["A"]):
            port = free_port()
            argv = ["taskset", "-c", "0", sys.executable, os.path.abspath(__file__),
                    "--serve", "--port", str(port)]
            if backend:
                argv += ["--backend", backend]
            if url:
                argv += ["--redis", url]
            procs[f"server {name}"] = _start(argv)
            ports.append(port)
        per_server = members if kind == "redis" else 2 * members
        out = _drive(procs, ports, per_server, seconds, window, rate)
        out["server"] = kind
        return out
    finally:
        for p in procs.values():
            _stop(p)


def _connect_members(ports: List[int], per_server: int) -> List[socket.socket]:
    socks = []
    for port in ports:
        for _ in range(per_server):
            s = socket.create_connection(("127.0.0.1", port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 18)
            s.sendall(b"M")
            socks.append(s)
    for s in socks:
        if s.recv(1) != b"!":
            raise RuntimeError("a member was not acknowledged")
    return socks


def _drive(procs: Dict[str, "subprocess.Popen[Any]"], ports: List[int], per_server: int,
           seconds: float, window: int, rate: float) -> Dict[str, Any]:
    socks = _connect_members(ports, per_server)
    members = len(socks)
    time.sleep(0.5)              # presence and subscriptions settle
    pub = socket.create_connection(("127.0.0.1", ports[0]))
    pub.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pub.sendall(b"P")
    assert pub.recv(1) == b"!"
    # Sampled members (for latency): spread over the servers.
    step = max(1, members // 10)
    sampled = {socks[i].fileno() for i in range(0, members, step)}
    for s in socks:
        s.setblocking(False)
    pub.setblocking(False)
    ep = select.epoll()
    fds = {}
    for s in socks:
        ep.register(s.fileno(), select.EPOLLIN)
        fds[s.fileno()] = s
    partial: Dict[int, bytes] = {fd: b"" for fd in sampled}
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    filler = bytes(MSG - STAMP.size)

    def stamp_batch(k: int) -> bytes:
        t = time.perf_counter_ns()
        return (STAMP.pack(t) + filler) * k

    total = {"published": 0, "received": 0}     # messages sent; bytes, all members

    def phase(duration: float, paced: bool, drain: bool = False) -> Dict[str, Any]:
        """Publish for `duration` (as fast as the window allows, or at `rate`), or
        with `drain` only read until every message published so far has arrived."""
        published = total["published"]
        received = total["received"]
        start_received = received
        lat: List[int] = []
        pending = b""
        cpu0 = {name: cpu_seconds(p.pid) for name, p in procs.items()}
        self0 = time.process_time()
        t0 = time.perf_counter()
        end = t0 + duration
        next_send = t0
        while True:
            now = time.perf_counter()
            in_flight = published - received // (MSG * members)
            if drain:
                if in_flight == 0 or now >= end:
                    break
            elif now >= end:
                break
            if not pending and not drain:
                if paced:
                    if now >= next_send and in_flight < window:
                        pending = stamp_batch(1)
                        next_send += 1.0 / rate
                elif in_flight < window:
                    pending = stamp_batch(min(64, window - in_flight))
            if pending:
                try:
                    n = pub.send(pending)
                    published += n // MSG
                    pending = pending[n:]
                    if len(pending) % MSG:
                        raise RuntimeError("a partial message was sent")
                except BlockingIOError:
                    pass
            timeout = 0.0 if (pending and not paced) else 0.0005
            for fd, _ in ep.poll(timeout):
                s = fds[fd]
                while True:
                    try:
                        n = s.recv_into(view)
                    except BlockingIOError:
                        break
                    if n == 0:
                        raise RuntimeError("the server closed a member")
                    received += n
                    if fd in sampled:
                        t_recv = time.perf_counter_ns()
                        data = partial[fd] + bytes(view[:n])
                        whole = len(data) - len(data) % MSG
                        for off in range(0, whole, MSG):
                            lat.append(t_recv - STAMP.unpack_from(data, off)[0])
                        partial[fd] = data[whole:]
                    if n < len(buf):
                        break
        dt = time.perf_counter() - t0
        cpu = {name: (cpu_seconds(p.pid) - cpu0[name]) / dt for name, p in procs.items()}
        cpu["driver"] = (time.process_time() - self0) / dt
        lat.sort()
        total["published"], total["received"] = published, received
        return {"delivered_per_s": (received - start_received) / MSG / dt, "cpu": cpu,
                "lat": lat}

    phase(1.0, paced=False)                   # warm up
    thr = phase(seconds, paced=False)
    phase(30.0, paced=False, drain=True)      # the backlog out of the way
    paced = phase(seconds, paced=True)
    lat = paced["lat"]
    for s in socks:
        s.close()
    pub.close()
    ep.close()

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] / 1e3 if lat else float("nan")
    return {
        "members": members,
        "delivered_per_s": thr["delivered_per_s"],
        "cpu": thr["cpu"],
        "p50_us": pct(0.50), "p99_us": pct(0.99), "samples": len(lat),
        "paced_cpu": paced["cpu"],
    }


def _cpu_text(cpu: Dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0%}" for k, v in cpu.items())


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", action="store_true")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--redis", default=None)
    p.add_argument("--backend", default=None)
    p.add_argument("--members", type=int, default=500, help="members per server")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--window", type=int, default=256,
                   help="messages in flight at most (publisher ahead of the members)")
    p.add_argument("--rate", type=float, default=200.0,
                   help="messages per second while measuring latency")
    p.add_argument("--cells", default="local,redis")
    args = p.parse_args(argv)
    if args.serve:
        serve_room(args.port, args.backend, args.redis)
        return 0
    print(f"load average: {open('/proc/loadavg').read().split()[:3]}", flush=True)
    cells: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as workdir:
        for r in range(args.rounds):
            for kind in args.cells.split(","):
                cell = run_cell(kind, args.members, args.seconds, args.window, args.rate,
                                args.backend, workdir)
                cells.append(cell)
                print(f"round {r} {kind:6s} {cell['delivered_per_s']:>11,.0f} deliveries/s "
                      f"({cell['delivered_per_s'] / cell['members']:>7,.0f} msg/s)  "
                      f"p50 {cell['p50_us']:>7,.0f} us  p99 {cell['p99_us']:>7,.0f} us"
                      f"  [CPU: {_cpu_text(cell['cpu'])}]", flush=True)
    print(f"\nbest of each ({2 * args.members} members; latency at {args.rate:g} msg/s):")
    best: Dict[str, Dict[str, Any]] = {}
    for kind in args.cells.split(","):
        mine = [c for c in cells if c["server"] == kind]
        b = max(mine, key=lambda c: c["delivered_per_s"])
        p50 = min(c["p50_us"] for c in mine)
        p99 = min(c["p99_us"] for c in mine)
        best[kind] = {"p50": p50, "p99": p99}
        print(f"  {kind:6s} {b['delivered_per_s'] / b['members']:>9,.0f} msg/s "
              f"({b['delivered_per_s']:>11,.0f} deliveries/s)  p50 {p50:,.0f} us  "
              f"p99 {p99:,.0f} us  [CPU: {_cpu_text(b['cpu'])}]")
    if "local" in best and "redis" in best:
        print(f"  added by redis: p50 +{best['redis']['p50'] - best['local']['p50']:,.0f} us"
              f", p99 +{best['redis']['p99'] - best['local']['p99']:,.0f} us")
    print(f"load average: {open('/proc/loadavg').read().split()[:3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
