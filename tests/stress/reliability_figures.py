"""Issue 16's cases, measured (not a test): what a server does with peers that never
read, a session factory that fails, a signal while a hook runs, a busy CallEvery, and
the same mistake made in four calls.  Prints one line per case, with the log lines
that matter below it, so that a build before and after the fixes can be compared:

    python tests/stress/reliability_figures.py                  # every case, both backends
    python tests/stress/reliability_figures.py stall --seconds 20 --backends epoll
    python tests/stress/reliability_figures.py factory timer wording signals

Only public names are used, and names a build may not have yet (send_timeouts,
factory_failures, Timer.skipped) print as n/a, so it runs against an older build too
(PYTHONPATH pointing at it).  The signal cases start tests/stress/run_until_signal.py
in a subprocess.  Timings are wall-clock on whatever else the machine is doing.
"""
import argparse
import io
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import iocpnet

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))     # tests/: the shared factories
from factories import failing_factory  # noqa: E402


def start(backend, factory, slots, workers=2):
    core = iocpnet.IocpCore(backend)
    service = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), factory, slots)
    service.Start()

    def work():
        while core.Dispatch() >= 0:
            pass

    for _ in range(workers):
        threading.Thread(target=work, daemon=True).start()
    return core, service, ("127.0.0.1", service.listener.port)


def stop(core, service):
    service.Stop(5)
    core.Close(5)


def capture_log():
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger("iocpnet")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return buf, lambda: log.removeHandler(handler)


# ---- 1. peers that send and never read, beside one that reads slowly ----

def stall(backend, seconds, send_timeout):
    ended = {}
    blob = bytes(i * 7 & 0xFF for i in range(8 << 20))

    class Echo(iocpnet.Session):
        send_queue_limit = 16 << 20

        def OnRecv(self, data):
            if bytes(data) == b"PUSH":
                self.Send(blob)               # for the slow reader
            else:
                self.Send(data)

        def OnDisconnected(self, reason):
            ended[self.address[1]] = (time.monotonic(), reason)

    if send_timeout is not None:
        Echo.send_timeout = send_timeout
    core, service, address = start(backend, Echo, 16)
    last = {}
    stop_flag = threading.Event()

    def never_read(c):
        port = c.getsockname()[1]
        c.setblocking(False)
        chunk = b"x" * 16384
        while not stop_flag.is_set():
            _, w, _ = select.select([], [c], [], 0.05)
            if w:
                try:
                    c.send(chunk)
                    last[port] = time.monotonic()
                except BlockingIOError:
                    pass
                except OSError:
                    return

    got = bytearray()

    def slow_reader(c):
        c.settimeout(5)
        c.sendall(b"PUSH")
        while not stop_flag.is_set() and len(got) < len(blob):
            try:
                data = c.recv(4096)          # 4 KiB every 50 ms: ~80 KiB/s
            except OSError:
                return
            if not data:
                return
            got.extend(data)
            time.sleep(0.05)

    peers = []
    for _ in range(4):
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.connect(address)
        peers.append(c)
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader.connect(address)
    threads = [threading.Thread(target=never_read, args=(c,), daemon=True) for c in peers]
    threads.append(threading.Thread(target=slow_reader, args=(reader,), daemon=True))
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop_flag.set()
    for t in threads:
        t.join(10)
    ports = [c.getsockname()[1] for c in peers]
    cut = [p for p in ports if p in ended]
    reader_port = reader.getsockname()[1]
    st = service.stats() if hasattr(service, "stats") else {}
    if not hasattr(iocpnet.Session, "send_timeout"):
        shown = "n/a"
    else:
        shown = "the default (10 s)" if send_timeout is None else f"{send_timeout:g} s"
    print(f"[{backend}] send_timeout {shown}, {seconds:g} s: "
          f"{len(cut)} of 4 never-reading peers cut; sessions still open "
          f"{service.session_count}; their send queues "
          f"{sorted(s.send_queue_bytes for s in service.sessions if s.address[1] in ports)}; "
          f"send_timeouts {getattr(service, 'send_timeouts', 'n/a')} "
          f"(stats: {st.get('send_timeouts', 'n/a')})")
    for p in ports:
        if p in ended:
            print(f"    peer {p}: cut {ended[p][0] - last.get(p, 0):.2f} s after the kernel "
                  f"last took a byte from it: {ended[p][1]}")
    print(f"    slow reader (4 KiB / 50 ms): "
          f"{'cut: ' + ended[reader_port][1] if reader_port in ended else 'not cut'}, "
          f"read {len(got)} bytes, {'all' if got == blob[:len(got)] else 'NOT all'} right")
    for c in peers + [reader]:
        c.close()
    stop(core, service)


# ---- 2. a session factory that fails ----

def factory_burst(backend, slots, burst):
    buf, done = capture_log()

    class Echo(iocpnet.Session):
        def OnRecv(self, data):
            self.Send(data)

    failing = [0]
    lock = threading.Lock()

    def factory():
        with lock:
            left = failing[0]
            if left:
                failing[0] -= 1
        if left:
            raise RuntimeError("the session pool is empty")
        return Echo()

    core, service, address = start(backend, factory, slots)
    with lock:
        failing[0] = burst
    answered = 0
    clients = []
    t0 = time.monotonic()
    for _ in range(slots + 5):
        c = socket.create_connection(address)
        c.sendall(b"hi")
        clients.append(c)
    deadline = time.monotonic() + 10          # for all of them: a lost slot never answers
    for c in clients:
        c.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if c.recv(2) == b"hi":
                answered += 1
        except socket.timeout:
            pass
    took = time.monotonic() - t0
    done()
    lines = buf.getvalue().splitlines()
    print(f"[{backend}] {slots} slots, factory fails {burst} times: {answered} of "
          f"{len(clients)} later clients answered ({took:.1f} s); accepts_posted "
          f"{service.listener.accepts_posted}; factory_failures "
          f"{getattr(service, 'factory_failures', 'n/a')}; log: "
          f"{sum('Traceback' in line for line in lines)} tracebacks, {len(lines)} lines")
    shown = [line for line in lines if "factory" in line]
    for line in shown[:6]:
        print("    |", line)
    if len(shown) > 6:
        print(f"    | ... and {len(shown) - 6} more such lines")
    for c in clients:
        c.close()
    stop(core, service)


def factory_back_off(backend, seconds):
    """The factory fails for `seconds` with one slot: when is it called again?"""
    buf, done = capture_log()

    class Echo(iocpnet.Session):
        def OnRecv(self, data):
            self.Send(data)

    factory, failing, calls = failing_factory(Echo)
    core, service, address = start(backend, factory, 1)
    failing.set()
    first = socket.create_connection(address)
    time.sleep(0.2)
    waiting = socket.create_connection(address)
    waiting.settimeout(10)
    waiting.sendall(b"hi")
    time.sleep(seconds)
    failing.clear()
    t0 = time.monotonic()
    try:
        answer = f"answered {time.monotonic() - t0:.2f} s after the factory worked" \
            if waiting.recv(2) == b"hi" else "not answered"
    except socket.timeout:
        answer = "not answered within 10 s"
    done()
    gaps = ", ".join(f"{(b - a) * 1000:.0f}" for a, b in zip(calls, calls[1:]))
    print(f"[{backend}] 1 slot, factory failing for {seconds:g} s: called {len(calls)} "
          f"times, ms between calls: [{gaps}]; the waiting client {answer}; "
          f"factory_failures {getattr(service, 'factory_failures', 'n/a')}")
    for line in buf.getvalue().splitlines():
        if "factory" in line:
            print("    |", line)
    first.close()
    waiting.close()
    stop(core, service)


# ---- 3. SIGINT while a hook runs (tests/stress/run_until_signal.py) ----

def signal_case(backend, label, hook, timeout, second=False, reply=1 << 18):
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "run_until_signal.py"),
                          "--backend", backend, "--hook-seconds", str(hook),
                          "--shutdown-timeout", str(timeout), "--reply-bytes", str(reply)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(l.rstrip() for l in p.stdout),
                              daemon=True)
    reader.start()

    def wait_line(pattern):
        end = time.monotonic() + 30
        while time.monotonic() < end:
            for line in list(lines):
                m = re.search(pattern, line)
                if m:
                    return m
            time.sleep(0.01)
        p.kill()
        raise SystemExit(f"no line {pattern!r} in {lines}")

    port = int(wait_line(r"listening on 127\.0\.0\.1:(\d+)").group(1))
    c = socket.create_connection(("127.0.0.1", port))
    c.settimeout(60)
    c.sendall(b"work")
    wait_line(r"in OnRecv")
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    if second:
        wait_line(r"SIGINT received")
        time.sleep(0.3)
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
    got = bytearray()
    if not second and hook < 5:
        try:
            while True:
                data = c.recv(65536)
                if not data:
                    break
                got += data
        except OSError:
            pass
    p.wait(120)
    took = time.monotonic() - t0
    reader.join(5)
    right = got == bytes(i & 0xFF for i in range(len(got)))
    # Run's return, by the system's monotonic clock (the same in both processes); the
    # exit comes later (the interpreter's finalization, a worker still in its hook).
    returned = [float(m.group(1)) for m in
                (re.search(r"Run returned at ([\d.]+)", line) for line in lines) if m]
    ran = f"Run returned {returned[0] - t0:.2f} s, " if returned else "Run did not return, "
    print(f"[{backend}] {label}: {ran}exit {took:.2f} s after the "
          f"{'second ' if second else ''}signal, rc {p.returncode}, client got {len(got)} "
          f"of {reply} reply bytes{'' if right else ' (WRONG bytes)'}")
    for line in lines:
        if re.search(r"WARNING|Traceback|Error|reply queued", line):
            print("    |", line)
    c.close()


def signals(backend):
    signal_case(backend, "hook busy 1 s, shutdown_timeout 10", 1.0, 10)
    signal_case(backend, "hook stuck 60 s, shutdown_timeout 5", 60, 5.0)
    signal_case(backend, "hook stuck 60 s, shutdown_timeout 30, second SIGINT", 60, 30,
                second=True)


# ---- 4. CallEvery with work in the callback ----

def timer(backend):
    core = iocpnet.IocpCore(backend)

    def work():
        while core.Dispatch() >= 0:
            pass

    threads = [threading.Thread(target=work, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    for busy in (0.005, 0.050):
        runs = []

        def tick():
            runs.append(time.monotonic())
            time.sleep(busy)

        t0 = time.monotonic()
        tm = core.CallEvery(0.020, tick)
        time.sleep(2.0)
        tm.Cancel()
        time.sleep(0.1)
        elapsed = runs[-1] - t0
        print(f"[{backend}] CallEvery(0.020) with {busy * 1000:.0f} ms of work: {len(runs)} "
              f"runs in {elapsed:.2f} s = {len(runs) / elapsed:.1f}/s; skipped "
              f"{getattr(tm, 'skipped', 'n/a')}; mean gap "
              f"{1000 * (runs[-1] - runs[0]) / (len(runs) - 1):.1f} ms")
    core.Close(5)
    for t in threads:
        t.join(5)


# ---- 5. the same mistake in four calls; Start after Stop ----

def wording(backend):
    core, service, address = start(backend, iocpnet.PacketSession, 4, workers=1)
    c = socket.create_connection(address)
    while service.session_count < 1:
        time.sleep(0.01)
    (s,) = service.sessions
    for bad in ("some text", 5):
        for name, call in [("Send", lambda: s.Send(bad)),
                           ("Broadcast", lambda: service.Broadcast(bad)),
                           ("SendPacket", lambda: s.SendPacket(1, bad)),
                           ("make_packet", lambda: iocpnet.make_packet(1, bad))]:
            try:
                print(f"{name}({bad!r}) -> returned {call()!r}")
            except Exception as e:
                print(f"{name}({bad!r}) -> {type(e).__name__}: {e}")
    c.settimeout(0.3)
    try:
        print(f"the client received {c.recv(100)!r}")
    except socket.timeout:
        print("the client received nothing")
    del s
    c.close()
    service.Stop(2)
    try:
        service.Start()
        print("Start() after Stop() -> started")
    except Exception as e:
        print(f"Start() after Stop() -> {type(e).__name__}: {e}")
    core.Close(2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="*",
                    default=["stall", "factory", "signals", "timer", "wording"])
    ap.add_argument("--backends", default="io_uring,epoll")
    ap.add_argument("--seconds", type=float, default=20.0,
                    help="how long the never-reading peers push (stall)")
    ap.add_argument("--send-timeout", type=float, default=None,
                    help="the session class's send_timeout (stall; default: the library's)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    for backend in args.backends.split(","):
        for case in args.cases:
            if case == "stall":
                stall(backend, args.seconds, args.send_timeout)
            elif case == "factory":
                factory_burst(backend, 5, 5)
                factory_burst(backend, 100, 5)
                factory_burst(backend, 100, 100)
                factory_back_off(backend, 7.0)
            elif case == "signals":
                signals(backend)
            elif case == "timer":
                timer(backend)
            elif case == "wording":
                if backend == args.backends.split(",")[0]:
                    wording(backend)
            else:
                ap.error(f"unknown case {case!r}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
