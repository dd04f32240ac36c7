"""Churn without leaks: N cycles of connect / one round trip / disconnect against an
iocpnet echo server, then proof that nothing was left behind.

    python tests/stress/churn.py                      # 100,000 cycles, default backend
    python tests/stress/churn.py --cycles 3000 --warmup 1000 --backend epoll --json

The server runs in this process (so its counters can be read); the clients run in a
child process (this script with --client), several threads of plain blocking sockets,
each cycle checking its echo byte for byte.  Checks, after the run:

- server RSS after the run is within --rss-margin-mb of RSS after the warm-up (both
  measured with the service idle, after gc);
- every session that connected got exactly one OnDisconnected, and every cycle was one
  session;
- while the service still runs, the only operations in flight are its posted accepts
  (once the send_timeout sweep stopped, within 2 s), and no receive buffer is out; after Stop and Close, core.stats() in_flight is 0 and
  every debug counter is back to 0;
- no object of a Session subclass is left (gc).

Prints the figures (RSS before/after, counters, cycles/s); --json adds one JSON line at
the end for tests/test_resources.py.  Exit status 0 when every check passed.
"""
import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import threading
import time


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---- the client side (a child process) -----------------------------------------------

def run_clients(port, cycles, threads):
    errors = []
    done = [0] * threads

    def client(t):
        n = cycles // threads + (1 if t < cycles % threads else 0)
        for k in range(n):
            msg = b"churn %d/%d " % (t, k) + b"x" * (k % 50)
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                    s.sendall(msg)
                    got = b""
                    while len(got) < len(msg):
                        chunk = s.recv(len(msg) - len(got))
                        if not chunk:
                            break
                        got += chunk
                if got != msg:
                    errors.append(f"thread {t} cycle {k}: echo {got[:40]!r} != {msg[:40]!r}")
                    return
                done[t] += 1
            except OSError as e:
                errors.append(f"thread {t} cycle {k}: {e!r}")
                return

    ts = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    print(json.dumps({"done": sum(done), "errors": errors[:10]}), flush=True)
    return 0 if not errors and sum(done) == cycles else 1


# ---- the server side ------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=100_000)
    ap.add_argument("--warmup", type=int, default=5_000)
    ap.add_argument("--backend", default=None, help="io_uring or epoll (default: best)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--client-threads", type=int, default=4)
    ap.add_argument("--accepts", type=int, default=64)
    ap.add_argument("--rss-margin-mb", type=float, default=8.0,
                    help="allowed RSS growth from after the warm-up to after the run")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--client", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        return run_clients(args.client, args.cycles, args.client_threads)

    import iocpnet

    lock = threading.Lock()
    counts = {"connected": 0, "disconnected": 0, "twice": 0}

    class ChurnEcho(iocpnet.Session):
        def OnConnected(self):
            with lock:
                counts["connected"] += 1

        def OnRecv(self, data):
            self.Send(data)

        def OnDisconnected(self, reason):
            with lock:
                counts["disconnected"] += 1
                if getattr(self, "gone", False):
                    counts["twice"] += 1
            self.gone = True

    core = iocpnet.IocpCore(args.backend)
    service = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), ChurnEcho,
                              args.accepts)
    service.Start()
    port = service.listener.port

    def worker():
        while core.Dispatch() >= 0:
            pass

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(args.workers)]
    for w in workers:
        w.start()

    failures = []

    def clients(n):
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--client", str(port),
                            "--cycles", str(n), "--client-threads", str(args.client_threads)],
                           capture_output=True, text=True, timeout=max(120, n / 50))
        dt = time.monotonic() - t0
        try:
            out = json.loads(p.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            out = {"done": 0, "errors": [p.stdout[-500:], p.stderr[-2000:]]}
        if p.returncode != 0 or out["errors"]:
            failures.append(f"clients: exit {p.returncode}, {out['done']}/{n} cycles, "
                            f"errors: {out['errors']}")
        return dt

    def settle(expected):
        deadline = time.monotonic() + 30
        while (service.session_count or counts["disconnected"] < expected) and \
                time.monotonic() < deadline:
            time.sleep(0.01)
        gc.collect()
        time.sleep(0.2)
        gc.collect()

    backend = core.backend
    clients(args.warmup)
    settle(args.warmup)
    rss_warm = rss_bytes()
    dt = clients(args.cycles)
    total = args.warmup + args.cycles
    settle(total)
    rss_after = rss_bytes()
    # The send_timeout sweep stops at its first tick with no session: at most one
    # period (500 ms at the default send_timeout) after the last one ended.
    deadline = time.monotonic() + 2.0
    # One multishot accept serves every connection (io_uring), else one per slot.
    accept_ops = 1 if service.listener.multishot else args.accepts
    while core.stats()["in_flight"] > accept_ops and time.monotonic() < deadline:
        time.sleep(0.01)
    running_stats = core.stats()
    live_sessions = service.session_count

    service.Stop()
    core.Close()
    for w in workers:
        w.join(10)
    final_stats = core.stats()
    alive_workers = sum(w.is_alive() for w in workers)
    del service, core
    gc.collect()
    counters = iocpnet.debug_counters()
    left = sum(1 for o in gc.get_objects() if isinstance(o, iocpnet.Session))

    growth = rss_after - rss_warm
    # Under AddressSanitizer (scripts/sanitize.sh) freed memory sits in ASan's
    # quarantine and every allocation has redzones: RSS says nothing about leaks there.
    asan = "libasan" in os.environ.get("LD_PRELOAD", "")
    figures = {
        "backend": backend,
        "cycles": args.cycles,
        "warmup": args.warmup,
        "seconds": round(dt, 2),
        "cycles_per_s": round(args.cycles / dt, 1) if dt > 0 else None,
        "rss_after_warmup_mb": round(rss_warm / 2**20, 2),
        "rss_after_run_mb": round(rss_after / 2**20, 2),
        "rss_growth_mb": round(growth / 2**20, 2),
        "rss_margin_mb": args.rss_margin_mb,
        "rss_checked": not asan,
        "connected": counts["connected"],
        "disconnected": counts["disconnected"],
        "in_flight_while_running": running_stats["in_flight"],
        "accepts_posted": args.accepts,
        "accept_ops": accept_ops,
        "recv_buffers_out_while_running": running_stats["recv_buffers_out"],
        "in_flight_after_close": final_stats["in_flight"],
        "recv_buffers_out_after_close": final_stats["recv_buffers_out"],
        "debug_counters": counters,
        "session_objects_left": left,
        "live_sessions_after_run": live_sessions,
        "workers_alive": alive_workers,
    }
    if growth > args.rss_margin_mb * 2**20 and not asan:
        failures.append(f"RSS grew by {growth / 2**20:.2f} MiB over the run "
                        f"(margin {args.rss_margin_mb} MiB)")
    if counts["connected"] != total or counts["disconnected"] != total or counts["twice"]:
        failures.append(f"{counts['connected']} connected, {counts['disconnected']} "
                        f"disconnected ({counts['twice']} twice) for {total} cycles")
    if live_sessions:
        failures.append(f"{live_sessions} sessions still live after the run")
    if running_stats["in_flight"] != accept_ops or running_stats["recv_buffers_out"]:
        failures.append(f"while idle: {running_stats['in_flight']} operations in flight "
                        f"(the {accept_ops} accept operations expected), "
                        f"{running_stats['recv_buffers_out']} receive buffers out")
    if final_stats["in_flight"] or final_stats["recv_buffers_out"]:
        failures.append(f"after Close: {final_stats}")
    if any(counters.values()):
        failures.append(f"debug counters not back to 0: {counters}")
    if left:
        failures.append(f"{left} Session objects left after gc")
    if alive_workers:
        failures.append(f"{alive_workers} worker(s) still running after Close")

    print(f"churn [{backend}]: {args.cycles} cycles in {dt:.1f} s "
          f"({figures['cycles_per_s']} cycles/s), after {args.warmup} warm-up cycles")
    print(f"  RSS after warm-up {figures['rss_after_warmup_mb']} MiB, after the run "
          f"{figures['rss_after_run_mb']} MiB (growth {figures['rss_growth_mb']} MiB, "
          f"margin {args.rss_margin_mb} MiB{'; not checked under ASan' if asan else ''})")
    print(f"  sessions: {counts['connected']} connected, {counts['disconnected']} "
          f"disconnected, {live_sessions} live after the run, {left} objects left after gc")
    print(f"  in flight: {running_stats['in_flight']} while idle (= {accept_ops} accept "
          f"operations), {final_stats['in_flight']} after Close; receive buffers out: "
          f"{running_stats['recv_buffers_out']}, {final_stats['recv_buffers_out']}")
    print(f"  debug counters after Close: {counters}")
    for f in failures:
        print(f"  FAIL: {f}")
    print("churn: " + ("FAILED" if failures else "ok"))
    if args.json:
        figures["failures"] = failures
        print(json.dumps(figures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
