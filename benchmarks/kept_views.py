#!/usr/bin/env python3
"""What OnRecv views cost: memory per kept message, other sessions beside a hoarder,
receive-buffer exhaustion, echo.

    python benchmarks/kept_views.py memory   [--count 100000] [--size 2] [--keep list|deque]
    python benchmarks/kept_views.py latency  [--seconds 5] [--buffers 64]
    python benchmarks/kept_views.py stampede [--seconds 5] [--buffers 4] [--conns 200]
    python benchmarks/kept_views.py echo     --build A=DIR --build B=DIR [--rounds 5]

memory   A server keeps every message it gets (``kept.append(data)``, the pattern of a
         game that queues input for the next tick); clients send ``--size``-byte messages
         one at a time (each is its own OnRecv call).  The server's RSS is read from
         /proc/PID/statm after a warm-up and after ``--count`` kept messages: the
         difference per message is what one kept view costs, list slot included.  A
         figure other load on the machine does not change.  (On free-threaded builds a
         growing list's old arrays are freed late and add to it; ``--keep deque``
         measures without that.)
latency  On a core with ``--buffers`` receive buffers, one session keeps every message
         it receives, as fast as its client can send, while another session echoes
         16-byte pings: the echo round trip (p50, p99, max) with and without the
         hoarder, and how many pings got no answer within 2 s (counts do not depend on
         load; the round-trip times do).  A kept view that pinned a pool buffer froze
         the echo session once the pool was dry.
stampede ``--conns`` clients each send a message and wait for the answer, over and over;
         each hook holds its receive buffer ``--hold`` ms (work done on the message), on
         a core with ``--buffers`` receive buffers, so most receives wait for a buffer.
         Figures: messages answered, server CPU seconds per 1,000 answers (a buffer
         given back that re-armed every waiting receive cost one submission and one
         failed completion per waiter), and the answers' latency.
echo     Ping-pong throughput of benchmarks/servers/iocpnet_echo.py (one worker, pinned
         to CPU 0; benchmarks/build/loadgen pinned to CPU 1), for each ``--build NAME=DIR``
         (a PYTHONPATH holding an iocpnet build), interleaved round by round: what the
         view costs on the hottest path.  Take it only when the machine is quiet
         (``cat /proc/loadavg`` under about 0.7).

``--pythonpath DIR`` runs the server of memory, latency and stampede on another build
(an older one, to compare).  Each server runs in a process of its own (this file with
``serve``).  Every mode has a bounded run time (``--timeout``, ``--seconds``,
``--rounds``) and says what ended each measurement (all messages sent, the deadline, or
a server that stopped answering), and the machine's load average when it started.
Nothing here is a test: it prints figures, it asserts nothing.
"""
import argparse
import collections
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

from _common import cpu_seconds, wait_echo

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE = os.sysconf("SC_PAGE_SIZE")


# ---- the server (run as `kept_views.py serve ...` in its own process) ----------------------

def serve(args):
    import iocpnet

    # A list by default (the usual queue of input for the next tick).  On free-threaded
    # builds a growing list's old item arrays are freed late, which shows in the RSS
    # figure: --keep deque measures the views alone.
    kept = collections.deque() if args.keep == "deque" else []

    class Hoarder(iocpnet.Session):
        def OnRecv(self, data):
            if data[0] == 0x3F:                    # b"?": the count kept and core.stats()
                st = dict(core.stats(), kept=len(kept))
                self.Send(json.dumps(st).encode() + b"\n")
                return None
            if data[0] == 0x48:                    # b"H": work on it a while, keep nothing
                time.sleep(args.hold / 1000)
                self.Send(b"h")
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


def start_server(backend, buffers=0, workers=2, pythonpath=None, hold=0.0, keep="list"):
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    p = subprocess.Popen([sys.executable, __file__, "serve", "--backend", backend,
                          "--buffers", str(buffers), "--workers", str(workers),
                          "--hold", str(hold), "--keep", keep],
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


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def recv_exactly(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def server_stats(port):
    """The server's count of kept messages and its core.stats()."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"?")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)


class Limit:
    """What ended a measurement: the first reason reported wins."""

    def __init__(self):
        self.lock = threading.Lock()
        self.why = None

    def set(self, why):
        with self.lock:
            if self.why is None:
                self.why = why

    def __str__(self):
        return self.why or "every message sent and answered"


def keep_messages(port, total, conns=16, deadline=None, size=2, limit=None):
    """Send `total` messages of `size` bytes over `conns` connections, one at a time each.
    Returns how many were acknowledged (fewer if the deadline passed or the server stopped
    answering: `limit` says which)."""
    done = [0]
    lock = threading.Lock()
    limit = limit if limit is not None else Limit()

    def client(n):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(5)
            for i in range(n):
                if deadline and time.monotonic() > deadline:
                    limit.set("the deadline")
                    return
                s.sendall(b"%02d" % (i % 100) + b"x" * (size - 2))
                try:
                    recv_exactly(s, 1)
                except socket.timeout:
                    limit.set("the server stopped answering (no answer within 5 s)")
                    return
                except (OSError, ConnectionError) as e:
                    limit.set(f"the server closed a connection ({e})")
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
    print(f"load average at start: {loadavg()}")
    if args.size < 2:
        sys.exit("--size: at least 2")
    p, port = start_server(args.backend, args.buffers, workers=args.workers,
                           pythonpath=args.pythonpath, keep=args.keep)
    limit = Limit()
    try:
        warm = keep_messages(port, 2000, size=args.size, limit=limit)
        time.sleep(0.5)
        before = rss(p.pid)
        t0 = time.monotonic()
        got = keep_messages(port, args.count, deadline=time.monotonic() + args.timeout,
                            size=args.size, limit=limit)
        secs = time.monotonic() - t0
        time.sleep(0.5)
        after = rss(p.pid)
        try:
            st = server_stats(port)
        except (OSError, ValueError) as e:
            st = {"error": str(e)}
    finally:
        stop_server(p)
    print(f"backend {args.backend}, {warm} kept in warm-up, then {got} of {args.count} "
          f"{args.size}-byte messages kept in a {args.keep} in {secs:.1f} s "
          f"(ended by: {limit})")
    print(f"server RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB: "
          f"{(after - before) / max(got, 1):.0f} bytes per kept message")
    print("server's core after: " + ", ".join(
        f"{k} {st[k]}" for k in ("kept", "recv_buffers", "recv_buffers_out",
                                 "recv_buffers_detached", "recv_waiting", "error") if k in st))


# ---- latency beside a hoarder --------------------------------------------------------------

def echo_latencies(port, seconds, stop):
    """Ping-pong for `seconds`: (round-trip times, pings that got no answer within 2 s)."""
    rtts = []
    missed = 0
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
                return rtts, missed + 1          # no answer within 2 s: the session is stuck
            rtts.append(time.perf_counter() - t0)
            time.sleep(0.001)
    return rtts, missed


def summary(rtts):
    if not rtts:
        return "no answer"
    q = sorted(rtts)
    return (f"{len(q)} round trips, p50 {q[len(q) // 2] * 1e6:.0f} us, "
            f"p99 {q[int(len(q) * 0.99)] * 1e6:.0f} us, max {q[-1] * 1e6:.0f} us")


def bench_latency(args):
    print(f"load average at start: {loadavg()}")
    p, port = start_server(args.backend, args.buffers, workers=args.workers,
                           pythonpath=args.pythonpath)
    try:
        stop = threading.Event()
        alone, missed = echo_latencies(port, args.seconds, stop)
        print(f"echo alone:          {summary(alone)}, {missed} unanswered "
              f"(ended by: {'no answer within 2 s' if missed else f'{args.seconds:g} s'})")
        kept = [0]
        limit = Limit()

        def hoard():
            kept[0] = keep_messages(port, 10**9, conns=1, limit=limit,
                                    deadline=time.monotonic() + args.seconds + 1)

        h = threading.Thread(target=hoard)
        h.start()
        time.sleep(0.5)
        beside, missed = echo_latencies(port, args.seconds, stop)
        stop.set()
        h.join()
        print(f"echo beside hoarder: {summary(beside)}, {missed} unanswered "
              f"(ended by: {'no answer within 2 s' if missed else f'{args.seconds:g} s'})")
        print(f"the hoarding session kept {kept[0]} messages meanwhile "
              f"(recv_buffer_count={args.buffers}; ended by: {limit})")
        try:
            st = server_stats(port)
            print("server's core after: " + ", ".join(
                f"{k} {st[k]}" for k in ("kept", "recv_buffers", "recv_buffers_out",
                                         "recv_buffers_detached", "recv_waiting") if k in st))
        except (OSError, ValueError) as e:
            print(f"server's core after: no answer ({e})")
    finally:
        stop_server(p)


# ---- many receives waiting for few buffers -------------------------------------------------

def bench_stampede(args):
    print(f"load average at start: {loadavg()}")
    p, port = start_server(args.backend, args.buffers, workers=args.workers,
                           pythonpath=args.pythonpath, hold=args.hold)
    rtts = []
    per_client = []
    starved = [0]
    lock = threading.Lock()
    limit = Limit()
    try:
        socks = []
        for _ in range(args.conns):
            s = socket.create_connection(("127.0.0.1", port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(5)
            socks.append(s)
        start = threading.Barrier(args.conns + 1)
        end = [0.0]

        def client(s):
            mine = []
            start.wait()
            while time.monotonic() < end[0]:
                t0 = time.perf_counter()
                try:
                    s.sendall(b"H")
                    recv_exactly(s, 1)
                except socket.timeout:
                    # This client's message waited 5 s: it is out of the run.
                    with lock:
                        starved[0] += 1
                    break
                except (OSError, ConnectionError) as e:
                    limit.set(f"the server closed a connection ({e})")
                    break
                mine.append(time.perf_counter() - t0)
            with lock:
                rtts.extend(mine)
                per_client.append(len(mine))

        threads = [threading.Thread(target=client, args=(s,)) for s in socks]
        for t in threads:
            t.start()
        cpu0 = cpu_seconds(p.pid)
        end[0] = time.monotonic() + args.seconds
        start.wait()
        for t in threads:
            t.join()
        cpu = cpu_seconds(p.pid) - cpu0
        limit.set(f"{args.seconds:g} s")
        try:
            st = server_stats(port)
        except (OSError, ValueError):
            st = {}
        for s in socks:
            s.close()
    finally:
        stop_server(p)
    n = len(rtts)
    print(f"backend {args.backend}, {args.conns} clients, recv_buffer_count={args.buffers}, "
          f"each hook holds its buffer {args.hold:g} ms, {args.workers} workers "
          f"(ended by: {limit})")
    print(f"{n} answers, server CPU {cpu:.2f} s: {cpu * 1000 / max(n, 1):.3f} CPU s per "
          f"1,000 answers; {summary(rtts)}")
    q = sorted(per_client)
    print(f"answers per client: min {q[0]}, median {q[len(q) // 2]}, max {q[-1]}; "
          f"{starved[0]} of {args.conns} clients waited over 5 s for an answer and stopped")
    if st:
        print("server's core after: " + ", ".join(
            f"{k} {st[k]}" for k in ("submitted", "completed", "waits", "recv_buffers",
                                     "recv_waiting") if k in st)
              + f"; operations submitted per answer {st['submitted'] / max(n, 1):.2f}")


# ---- echo throughput, build against build --------------------------------------------------

def cpu_per_rt(r):
    """Server CPU time per round trip, in microseconds (nan if loadgen could not read it)."""
    cpu = r.get("server_cpu_s", -1)
    return cpu / r["roundtrips"] * 1e6 if cpu >= 0 and r.get("roundtrips") else float("nan")


def echo_limit(r):
    """What held a round back, from loadgen's own figures."""
    window = r.get("window_s") or 1.0
    waited = r.get("server_run_delay_s", 0.0) + r.get("loadgen_run_delay_s", 0.0)
    if waited > 0.05 * window:
        return (f"other load: server and loadgen waited {waited:.2f} s for a CPU in a "
                f"{window:.1f} s window")
    if r.get("loadgen_busy", 0.0) > 0.9:
        return f"the load generator (busy {r['loadgen_busy']:.0%})"
    return f"the server (loadgen busy {r.get('loadgen_busy', 0.0):.0%})"


def bench_echo(args):
    loadgen = os.path.join(HERE, "build", "loadgen")
    source = os.path.join(HERE, "loadgen.c")
    if not os.path.exists(loadgen) or os.path.getmtime(loadgen) < os.path.getmtime(source):
        os.makedirs(os.path.dirname(loadgen), exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-o", loadgen, os.path.join(HERE, "loadgen.c")],
                       check=True)
    builds = [b.split("=", 1) for b in args.build]
    results = {name: [] for name, _ in builds}
    print(f"load average at start: {loadavg()}; each round {args.seconds:g} s")
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
                wait_echo(port)               # READY comes before the server listens
                out = subprocess.run(["taskset", "-c", "1", loadgen, "-p", str(port), "-m",
                                      "pingpong", "-c", str(args.conns), "-s", "64",
                                      "-w", "1", "-t", str(args.seconds), "-P", str(srv.pid)],
                                     capture_output=True, text=True, check=True).stdout
                r = json.loads(out)
                results[name].append(r)
                print(f"round {rnd} {name}: {r['rt_per_s']:.0f} round trips/s, "
                      f"{cpu_per_rt(r):.1f} us server CPU per round trip; limited by "
                      f"{echo_limit(r)}", flush=True)
            finally:
                srv.terminate()
                srv.wait(10)
    for name, rs in results.items():
        rps = [r["rt_per_s"] for r in rs]
        cpu = [cpu_per_rt(r) for r in rs]
        print(f"{name}: median {statistics.median(rps):.0f} round trips/s over {len(rps)} "
              f"rounds (min {min(rps):.0f}, max {max(rps):.0f}); median "
              f"{statistics.median(cpu):.1f} us server CPU per round trip")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("memory", "latency", "stampede", "echo", "serve"))
    p.add_argument("--backend", default="io_uring", choices=("io_uring", "epoll"))
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--size", type=int, default=2, help="memory: message size (at least 2)")
    p.add_argument("--keep", choices=("list", "deque"), default="list",
                   help="memory: what the server keeps its views in")
    p.add_argument("--hold", type=float, default=1.0,
                   help="stampede: ms each hook holds its receive buffer")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--buffers", type=int, default=0, help="recv_buffer_count (0: default)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--pythonpath", help="PYTHONPATH for the server (an iocpnet build)")
    p.add_argument("--build", action="append", default=[], help="echo: NAME=PYTHONPATH")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--conns", type=int, default=0,
                   help="echo: loadgen connections (1); stampede: clients (200)")
    a = p.parse_args()
    if a.what == "serve":
        serve(a)
    elif a.what == "memory":
        bench_memory(a)
    elif a.what == "latency":
        if not a.buffers:
            a.buffers = 64
        bench_latency(a)
    elif a.what == "stampede":
        a.buffers = a.buffers or 4
        a.conns = a.conns or 200
        bench_stampede(a)
    else:
        a.conns = a.conns or 1
        bench_echo(a)


if __name__ == "__main__":
    main()
