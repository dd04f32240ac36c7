#!/usr/bin/env python3
"""Checks the checker: the load generator must fail loudly on a broken echo.

A benchmark that counts wrong echoes as round-trips would flatter a buggy
server, so this runs the load generator against deliberately broken servers
(corrupting, replaying stale data, dropping the connection) and expects the
documented exit codes: 0 ok, 2 connection error, 3 data mismatch.

It also checks the rate cap's bookkeeping (loadgen -r: a capped storm counts
connections, sleeps between its tokens and reports its schedule) and runs
the unit tests of the report's rules (benchmarks/test_rules.py).

usage: python benchmarks/selftest.py      (about 25 seconds; builds loadgen if needed)
"""
import json
import os
import socket
import subprocess
import sys
import statistics
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run  # noqa: E402  (reuses the build step)


class BadServer(threading.Thread):
    """Tiny blocking echo server, one thread per connection, with a defect."""

    def __init__(self, defect):
        super().__init__(daemon=True)
        self.defect = defect
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.chunks = []  # the size of every receive (how the load arrived)

    def run(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(c,), daemon=True).start()

    def serve(self, c):
        total, prev = 0, b""
        try:
            while True:
                d = c.recv(65536)
                if not d:
                    return
                self.chunks.append(len(d))
                if self.defect == "mute":  # reads, never answers
                    continue
                if self.defect == "slow":  # over two ticks of loadgen -b 8000 behind
                    time.sleep(0.02)
                out = d
                if self.defect == "corrupt" and total <= 1000 < total + len(d):
                    i = 1000 - total
                    out = d[:i] + bytes([d[i] ^ 0x01]) + d[i + 1:]
                elif self.defect == "stale" and prev and len(prev) == len(d):
                    out = prev  # the previous message again, same length
                elif self.defect == "close" and total > 5000:
                    return
                elif self.defect == "extra" and total > 3000:
                    out = d + b"x"
                prev = d
                total += len(d)
                c.sendall(out)
        except OSError:
            pass
        finally:
            c.close()


def loadgen(port, *args):
    p = subprocess.run([run.LOADGEN, "-p", str(port), "-w", "0.1", "-t", "0.4", *args],
                       capture_output=True, text=True, timeout=30)
    return p.returncode, p.stderr.strip()


def capped_checks():
    """loadgen -r against a correct server: (what, ok, detail) per check."""
    out = []
    srv = BadServer("none")
    srv.start()
    try:
        # a capped storm: one token per connection, the sleeping engine
        p = subprocess.run([run.LOADGEN, "-p", str(srv.port), "-m", "connect", "-c", "8",
                            "-r", "500", "-w", "0.2", "-t", "1"],
                           capture_output=True, text=True, timeout=30)
        d = json.loads(p.stdout) if p.returncode == 0 else {}
        sch = d.get("sched") or {}
        # at most the offered connections plus the bucket's burst (2 tokens);
        # started and completed in the window differ by at most the 8 that
        # can be in flight at its two ends
        ok = (p.returncode == 0 and d.get("engine") == "epoll" and sch.get("offered")
              and d["connections"] <= sch["offered"] + 2
              and sch["starts"] <= sch["offered"] + 2
              and abs(d["connections"] - sch["starts"]) <= 8)
        out.append(("connect -r 500: sleeping engine, one token per connection", ok,
                    f"exit {p.returncode}, engine {d.get('engine')}, {d.get('connections')} "
                    f"connections, offered {sch.get('offered')}, starts {sch.get('starts')}"))
        # a capped ping-pong reports its schedule; its starts are its round trips
        p = subprocess.run([run.LOADGEN, "-p", str(srv.port), "-m", "pingpong", "-c", "2",
                            "-r", "1000", "-w", "0.2", "-t", "0.5"],
                           capture_output=True, text=True, timeout=30)
        d = json.loads(p.stdout) if p.returncode == 0 else {}
        sch = d.get("sched") or {}
        ok = (p.returncode == 0 and sch.get("offered") and d["roundtrips"] <= sch["offered"] + 3
              and all(k in sch for k in ("late", "lost_late", "lost_full", "lag_us_mean")))
        out.append(("pingpong -r 1000: schedule reported, cap held", ok,
                    f"exit {p.returncode}, {d.get('roundtrips')} round trips, sched {sch}"))
    finally:
        srv.sock.close()
    # bursts (-b): each connection writes its share of a tick (2000/s x 8 ms
    # / 4 connections = 4 messages) in ONE send, so the server reads whole
    # bursts, where the token bucket alone sends them one by one (64 B)
    for defect, burst in (("none", ["-b", "8000"]), ("none", []), ("slow", ["-b", "8000"])):
        srv = BadServer(defect)
        srv.start()
        try:
            p = subprocess.run([run.LOADGEN, "-p", str(srv.port), "-m", "pipeline", "-c", "4",
                                "-d", "16", "-s", "64", "-r", "2000", *burst, "-w", "0.2",
                                "-t", "0.5"], capture_output=True, text=True, timeout=30)
        finally:
            srv.sock.close()
        d = json.loads(p.stdout) if p.returncode == 0 else {}
        sch = d.get("sched") or {}
        chunk = statistics.median(srv.chunks) if srv.chunks else 0
        if defect == "slow":
            # a server over a tick behind: its window is full at the ticks, the
            # credit goes out when echoes let it (deferred) or is dropped
            ok = (p.returncode == 0 and sch.get("deferred", 0) > 0.05 * sch.get("offered", 1)
                  and sch.get("lost_full", 0) > 0 and d["roundtrips"] < 0.9 * sch["offered"])
            what = "pipeline -r 2000 -b 8000 against a server 20 ms behind: deferred, dropped"
        elif burst:
            # every offered message is started or counted lost (late: the
            # generator; full: the echoes), whatever the machine's load; off
            # by a tick (16) at most, plus the credit (a window, 4 x 16) held
            # at either end of the measured window
            acct = sch.get("starts", 0) + sch.get("lost_late", 0) + sch.get("lost_full", 0)
            ok = (p.returncode == 0 and sch.get("burst_us") == 8000 and "deferred" in sch
                  and abs(acct - sch["offered"]) <= 16 + 2 * 64 and chunk >= 4 * 64)
            what = "pipeline -r 2000 -b 8000: each connection's tick in one send"
        else:
            ok = p.returncode == 0 and "burst_us" not in sch and chunk < 4 * 64
            what = "pipeline -r 2000 without -b: one message at a time"
        out.append((what, ok, f"exit {p.returncode}, {d.get('roundtrips')} round trips, median "
                              f"receive {chunk:g} B, sched {sch}"))
    return out


def main():
    if run.build_c().get("loadgen"):
        sys.exit("cannot build loadgen")
    traffic = [
        ("none", ["-m", "pingpong", "-c", "4", "-s", "100"], 0),
        ("none", ["-m", "pipeline", "-c", "4", "-d", "8", "-s", "1000"], 0),
        ("none", ["-m", "pipeline", "-c", "2", "-d", "4", "-s", "40000"], 0),
        ("corrupt", ["-m", "pingpong", "-s", "64"], 3),
        ("corrupt", ["-m", "pipeline", "-d", "16", "-s", "1024"], 3),
        ("stale", ["-m", "pingpong", "-s", "64"], 3),
        ("extra", ["-m", "pingpong", "-s", "64"], 3),
        ("close", ["-m", "pingpong", "-s", "64"], 2),
    ]
    # every engine that drives ping-pong and pipelined traffic gets every defect
    cases = [(d, a + ["-e", e], want) for e in ("uring", "epoll-busy", "epoll")
             for d, a, want in traffic]
    cases += [
        ("none", ["-m", "connect", "-c", "8"], 0),
        ("none", ["-m", "idle", "-n", "50", "-i", "0.2"], 0),
        ("corrupt", ["-m", "connect", "-c", "8", "-s", "2000"], 3),
        # arguments that measure nothing are refused before connecting (exit 1)
        ("none", ["-m", "pingpong", "-t", "0"], 1),
        ("none", ["-m", "connect", "-t", "0"], 1),
        ("none", ["-m", "pingpong", "-c", "3", "-T", "0"], 1),
        ("none", ["-m", "pingpong", "-H", ""], 1),
        # bursts need a rate, and a traffic mode
        ("none", ["-m", "pipeline", "-b", "1000"], 1),
        ("none", ["-m", "connect", "-r", "500", "-b", "1000"], 1),
    ]
    failed = 0
    for defect, args, want in cases:
        srv = BadServer(defect)
        srv.start()
        rc, err = loadgen(srv.port, *args)
        srv.sock.close()
        ok = rc == want
        failed += not ok
        print(f"{'ok ' if ok else 'BAD'} defect={defect:8} {' '.join(args):45} exit {rc} "
              f"(want {want}) {err.splitlines()[-1] if err else ''}")
    # a server that never answers: no round trip, and the error says where the
    # generator stood (messages in flight, its run delay), to tell a stall from
    # starvation
    srv = BadServer("mute")
    srv.start()
    rc, err = loadgen(srv.port, "-m", "pipeline", "-c", "2", "-d", "4", "-P", str(os.getpid()))
    srv.sock.close()
    ok = rc == 2 and "8 messages in flight" in err and "waited" in err
    failed += not ok
    print(f"{'ok ' if ok else 'BAD'} a mute server: exit {rc} (want 2) {err.splitlines()[-1]}")
    # speedprobe: a time that is not a number is refused; a tiny one still measures
    sp = os.path.join(run.BUILD, "speedprobe")
    probes = (("5abc", 1), ("", 1), ("1e-7", 0), ("1e-7 mem", 0), ("1e-7 wake", 0),
              ("5 fast", 1))
    for arg, want in probes:
        p = subprocess.run([sp, *(arg.split() or [arg])], capture_output=True, text=True,
                           timeout=30)
        ok = p.returncode == want and (want or '"units": 1' in p.stdout)
        failed += not ok
        print(f"{'ok ' if ok else 'BAD'} speedprobe {arg!r}: exit {p.returncode} (want {want}) "
              f"{(p.stdout or p.stderr).strip()}")
    # the safety guard: never load anything but loopback
    rc, err = subprocess.run([run.LOADGEN, "-a", "10.0.0.1", "-p", "9"], capture_output=True,
                             text=True).returncode, ""
    ok = rc == 1
    failed += not ok
    print(f"{'ok ' if ok else 'BAD'} non-loopback address refused (exit {rc})")
    checks = len(cases) + len(probes) + 2  # + the mute server, the non-loopback guard
    for what, ok, detail in capped_checks():
        checks += 1
        failed += not ok
        print(f"{'ok ' if ok else 'BAD'} {what} ({detail})")
    # the report's rules, on synthetic slices
    r = subprocess.run([sys.executable, "-m", "pytest", os.path.join(HERE, "test_rules.py"), "-q",
                        "-p", "no:cacheprovider"], capture_output=True, text=True, timeout=120)
    checks += 1
    failed += r.returncode != 0
    last = (r.stdout.strip().splitlines() or ["?"])[-1]
    print(f"{'ok ' if r.returncode == 0 else 'BAD'} report rules (test_rules.py): {last}")
    print(f"{checks - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
