"""An echo server for tests/test_resources.py's shutdown-under-load test: Stop() while
clients are mid-transfer and timers and jobs are pending.

    python tests/stress/shutdown_server.py --backend epoll --workers 4

Runs ``service.Run(workers)`` in the main thread, with, the whole time:
- 40 one-shot timers due in an hour (pending at shutdown: the test's own bound, pytest's
  timeout, ends any run long before) and 10 repeating 10 ms ticks;
- a thread posting small jobs with ``core.Post`` in bursts, so that jobs are queued
  when the shutdown starts.

Prints {"port": ...} when ready.  When standard input says "stop", it calls
``service.Stop()`` from that (non-worker) thread; ``Run`` then returns after its
graceful shutdown.  Then it checks, and prints as a last JSON line: every worker thread
ended, every session that connected got exactly one OnDisconnected, nothing is in flight,
every job posted before the shutdown ran, no timer callback ran after Run returned, and
after gc the debug counters are back to 0.  Exit status 0 when all of that holds.
"""
import argparse
import gc
import itertools
import json
import logging
import sys
import threading
import time

import iocpnet


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default=None)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    lock = threading.Lock()
    serials = itertools.count()
    connected = set()
    disconnects = {}
    reasons = {}

    class Echo(iocpnet.Session):
        # Shorter than Stop's 5 s wait, so that a client too slow to take its echo
        # (a busy machine, a sanitizer build) is closed by the flush deadline during
        # Stop, as this test expects.  (A session still flushing when Close starts has
        # its own test: test_close_ends_a_session_still_flushing_at_its_flush_timeout.)
        flush_timeout = 2.0
        # This test is about Stop, not stalls: on a machine loaded ~9 runnable threads
        # per core, the clients' one asyncio thread left 4 of its 200 echoes unread for
        # the default 10 s, and send_timeout rightly cut them before the Stop.
        send_timeout = 60.0

        def OnConnected(self):
            self.serial = next(serials)
            with lock:
                connected.add(self.serial)

        def OnRecv(self, data):
            self.Send(data)

        def OnDisconnected(self, reason):
            with lock:
                disconnects[self.serial] = disconnects.get(self.serial, 0) + 1
                reasons[reason] = reasons.get(reason, 0) + 1

    core = iocpnet.IocpCore(args.backend)
    service = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), Echo, 64)
    service.Start()

    ticks = [0]
    late = [0]
    early = [0]
    stopping = threading.Event()
    stopped = threading.Event()

    def tick():
        ticks[0] += 1
        if stopped.is_set():
            late[0] += 1

    def never():
        # Due in an hour: cancelled by the shutdown, never run.  Were a run ever to last
        # that long, a call before the stop says so, not that the shutdown failed (at
        # 60 s, 3.13t at load 13-17 took 64 s and all 40 came due before the stop).
        (late if stopping.is_set() else early)[0] += 1

    timers = [core.CallLater(3600, never) for _ in range(40)]
    timers += [core.CallEvery(0.01, tick) for _ in range(10)]

    jobs = {"posted": 0, "ran": 0, "refused": 0}
    posting = threading.Event()
    posting.set()

    def job(k):
        with lock:
            jobs["ran"] += 1
        sum(range(200))                   # a little work

    def poster():
        k = 0
        while posting.is_set():
            for _ in range(20):           # a burst, so that some are queued
                try:
                    core.Post(job, k)
                except Exception:
                    jobs["refused"] += 1  # the core is closed: Post says so
                    posting.clear()
                    break
                with lock:
                    jobs["posted"] += 1
                k += 1
            time.sleep(0.01)

    post_thread = threading.Thread(target=poster, daemon=True)
    post_thread.start()

    def controller():
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        stats["sessions_at_stop"] = service.session_count
        stats["jobs_posted_at_stop"] = jobs["posted"]
        stopping.set()
        t0 = time.monotonic()
        service.Stop()
        stats["stop_seconds"] = round(time.monotonic() - t0, 3)

    stats = {}
    print(json.dumps({"port": service.listener.port, "backend": core.backend}), flush=True)
    ctl = threading.Thread(target=controller, daemon=True)
    ctl.start()
    t0 = time.monotonic()
    service.Run(workers=args.workers)
    stats["run_returned_after"] = round(time.monotonic() - t0, 3)
    stopped.set()
    posting.clear()
    post_thread.join(10)

    workers = [t.name for t in threading.enumerate() if t.name.startswith("iocpnet-worker")]
    in_flight = core.stats()["in_flight"]
    # What is left, if anything (repr shows each session's state).
    stats["left"] = [f"{s!r} send_queue_bytes={s.send_queue_bytes}" for s in service.sessions]
    stats["core_stats"] = core.stats()
    time.sleep(0.1)                       # would a cancelled timer still fire?
    with lock:
        twice = {s: n for s, n in disconnects.items() if n != 1}
        missing = connected - set(disconnects)
        result = {
            "connected": len(connected),
            "disconnected": sum(disconnects.values()),
            "twice": len(twice),
            "missing": len(missing),
            "reasons": reasons,
            "workers_alive": workers,
            "in_flight": in_flight,
            "jobs": dict(jobs),
            "ticks": ticks[0],
            "late_timer_calls": late[0],
            "one_shot_calls_before_stop": early[0],
            **stats,
        }
    del service, core, timers, Echo
    gc.collect()
    result["debug_counters"] = iocpnet.debug_counters()
    problems = []
    if workers:
        problems.append("worker threads still alive")
    if twice or missing:
        problems.append("OnDisconnected not exactly once per session")
    if in_flight:
        problems.append("operations still in flight")
    if jobs["ran"] != jobs["posted"]:
        problems.append("a job posted before the shutdown did not run")
    if late[0]:
        problems.append("a timer callback ran after the shutdown")
    if early[0]:
        problems.append("a one-shot timer came due before the stop: the run outlasted its "
                        "delay, so the shutdown did not meet it pending")
    if any(result["debug_counters"].values()):
        problems.append("debug counters not back to 0")
    result["problems"] = problems
    print(json.dumps(result), flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
