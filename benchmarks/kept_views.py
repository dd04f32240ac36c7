#!/usr/bin/env python3
"""What OnRecv views cost: memory per kept message, other sessions beside a hoarder, echo.

    python benchmarks/kept_views.py memory   [--count 100000] [--backend io_uring]
    python benchmarks/kept_views.py latency  [--seconds 5] [--buffers 64]
    python benchmarks/kept_views.py echo     --build A=DIR --build B=DIR [--rounds 5]

memory   A server keeps every message it gets (``kept.append(data)``, the pattern of a
         game that queues input for the next tick); clients send 2-byte messages one at
         a time (each is its own OnRecv call).  The server's RSS is read from
         /proc/PID/statm after a warm-up and after ``--count`` kept messages: the
         difference per message is what one kept view costs, list slot included.
latency  On a core with ``--buffers`` receive buffers, one session keeps every message
         it receives, as fast as its client can send, while another session echoes
         16-byte pings: the echo round trip (p50, p99, max) with and without the
         hoarder.  A kept view that pinned a pool buffer froze the echo session once
         the pool was dry.
echo     Ping-pong throughput of benchmarks/servers/iocpnet_echo.py (one worker, pinned
         to CPU 0; benchmarks/build/loadgen pinned to CPU 1), for each ``--build NAME=DIR``
         (a PYTHONPATH holding an iocpnet build), interleaved round by round: what the
         view costs on the hottest path.  Take it only when the machine is quiet
         (``cat /proc/loadavg`` under about 0.7).

Each server runs in a process of its own (this file with ``serve``); PYTHONPATH decides
which iocpnet it imports.  Nothing here is a test: it prints figures, it asserts nothing.
"""
import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE = os.sysconf("SC_PAGE_SIZE")


# ---- the server (run as `kept_views.py serve ...` in its own process) ----------------------

def serve(args):
    import iocpnet

    kept = []

    class Hoarder(iocpnet.Session):
        def OnRecv(self, data):
            if data[0] == 0x3F:                    # b"?": report the count kept
                self.Send(b"%d\n" % len(kept))
                return None
            if data[0] == 0x45:                    # b"E": echo, keep nothing
                self.Send(data)
                return None
            kept.append(data)
            self.Send(b"k")
            return None

    kw = {"recv_buffer_count": args.buffers} if args.buffers else {}
    core = iocpnet.IocpCore(args.backend, **kw)
    listener = iocpnet.Listener(("127.0.0.1", 0))
    service = iocpnet.Service(core, listener, Hoarder, 64)
    service.Start()
    print(listener.port, flush=True)
    def work():
        while core.Dispatch() >= 0:
            pass

    workers = [threading.Thread(target=work, daemon=True) for _ in range(args.workers)]
    for t in workers:
        t.start()
    sys.stdin.read()            # until the parent closes our stdin
    service.Stop()
    core.Close()


def start_server(backend, buffers=0, workers=2, pythonpath=None):
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    p = subprocess.Popen([sys.executable, __file__, "serve", "--backend", backend,
                          "--buffers", str(buffers), "--workers", str(workers)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
    port = int(p.stdout.readline())
    return p, port


def stop_server(p):
    try:
        p.stdin.close()
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def rss(pid):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def recv_exactly(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def keep_messages(port, total, conns=16, deadline=None):
    """Send `total` 2-byte messages over `conns` connections, one at a time each.
    Returns how many were acknowledged (fewer if the server stopped answering)."""
    done = [0]
    lock = threading.Lock()

    def client(n):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(5)
            for i in range(n):
                if deadline and time.monotonic() > deadline:
                    return
                s.sendall(b"%02d" % (i % 100))
                try:
                    recv_exactly(s, 1)
                except (OSError, ConnectionError):
                    return
                with lock:
                    done[0] += 1

    per = [total // conns + (1 if i < total % conns else 0) for i in range(conns)]
    threads = [threading.Thread(target=client, args=(n,)) for n in per]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0]


# ---- memory ------------------------------------------------------------------------------

def bench_memory(args):
    p, port = start_server(args.backend, args.buffers, pythonpath=args.pythonpath)
    try:
        warm = keep_messages(port, 2000)
        time.sleep(0.5)
        before = rss(p.pid)
        t0 = time.monotonic()
        got = keep_messages(port, args.count, deadline=time.monotonic() + args.timeout)
        secs = time.monotonic() - t0
        time.sleep(0.5)
        after = rss(p.pid)
    finally:
        stop_server(p)
    print(f"backend {args.backend}, {warm} kept in warm-up, then {got} of {args.count} "
          f"2-byte messages kept in {secs:.1f} s")
    print(f"server RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB: "
          f"{(after - before) / max(got, 1):.0f} bytes per kept message")
    if got < args.count:
        print(f"the server stopped answering after {got} messages ({args.timeout:.0f} s)")


# ---- latency beside a hoarder --------------------------------------------------------------

def echo_latencies(port, seconds, stop):
    rtts = []
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(2)
        end = time.monotonic() + seconds
        while time.monotonic() < end and not stop.is_set():
            msg = b"E" + b"%015d" % len(rtts)
            t0 = time.perf_counter()
            s.sendall(msg)
            try:
                recv_exactly(s, len(msg))
            except (OSError, ConnectionError):
                return rtts, True            # no answer within 2 s
            rtts.append(time.perf_counter() - t0)
            time.sleep(0.001)
    return rtts, False


def summary(rtts):
    if not rtts:
        return "no answer"
    q = sorted(rtts)
    return (f"{len(q)} round trips, p50 {q[len(q) // 2] * 1e6:.0f} us, "
            f"p99 {q[int(len(q) * 0.99)] * 1e6:.0f} us, max {q[-1] * 1e6:.0f} us")


def bench_latency(args):
    p, port = start_server(args.backend, args.buffers, pythonpath=args.pythonpath)
    try:
        stop = threading.Event()
        alone, stuck = echo_latencies(port, args.seconds, stop)
        print(f"echo alone:          {summary(alone)}" + ("  (then no answer)" if stuck else ""))
        kept = [0]

        def hoard():
            kept[0] = keep_messages(port, 10**9, conns=1,
                                    deadline=time.monotonic() + args.seconds + 1)

        h = threading.Thread(target=hoard)
        h.start()
        time.sleep(0.5)
        beside, stuck = echo_latencies(port, args.seconds, stop)
        stop.set()
        h.join()
        print(f"echo beside hoarder: {summary(beside)}" + ("  (then no answer for 2 s)" if stuck
                                                            else ""))
        print(f"the hoarding session kept {kept[0]} messages meanwhile "
              f"(recv_buffer_count={args.buffers})")
    finally:
        stop_server(p)


# ---- echo throughput, build against build --------------------------------------------------

def bench_echo(args):
    loadgen = os.path.join(HERE, "build", "loadgen")
    if not os.path.exists(loadgen):
        os.makedirs(os.path.dirname(loadgen), exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-o", loadgen, os.path.join(HERE, "loadgen.c")],
                       check=True)
    builds = [b.split("=", 1) for b in args.build]
    results = {name: [] for name, _ in builds}
    import json
    for rnd in range(args.rounds):
        order = builds if rnd % 2 == 0 else builds[::-1]
        for name, path in order:
            env = dict(os.environ, PYTHONPATH=path)
            port = 20000 + os.getpid() % 10000 + rnd
            srv = subprocess.Popen(["taskset", "-c", "0", sys.executable,
                                    os.path.join(HERE, "servers", "iocpnet_echo.py"), str(port),
                                    "--backend", args.backend],
                                   stdout=subprocess.PIPE, env=env, text=True)
            try:
                srv.stdout.readline()
                time.sleep(0.5)
                out = subprocess.run(["taskset", "-c", "1", loadgen, "-p", str(port), "-m",
                                      "pingpong", "-c", str(args.conns), "-s", "64",
                                      "-w", "1", "-t", str(args.seconds), "-P", str(srv.pid)],
                                     capture_output=True, text=True, check=True).stdout
                r = json.loads(out)
                results[name].append(r)
                print(f"round {rnd} {name}: {r.get('rps', r.get('round_trips_per_sec'))} "
                      f"rt/s, loadgen busy {r.get('loadgen_busy')}", flush=True)
            finally:
                srv.terminate()
                srv.wait(10)
    for name, rs in results.items():
        rps = [r["rt_per_s"] for r in rs]
        print(f"{name}: median {statistics.median(rps):.0f} round trips/s over {len(rps)} "
              f"rounds (min {min(rps):.0f}, max {max(rps):.0f})")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("memory", "latency", "echo", "serve"))
    p.add_argument("--backend", default="io_uring", choices=("io_uring", "epoll"))
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--buffers", type=int, default=0, help="recv_buffer_count (0: default)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--pythonpath", help="PYTHONPATH for the server (an iocpnet build)")
    p.add_argument("--build", action="append", default=[], help="echo: NAME=PYTHONPATH")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--conns", type=int, default=1)
    a = p.parse_args()
    if a.what == "serve":
        serve(a)
    elif a.what == "memory":
        bench_memory(a)
    elif a.what == "latency":
        if not a.buffers:
            a.buffers = 64
        bench_latency(a)
    else:
        bench_echo(a)


if __name__ == "__main__":
    main()
