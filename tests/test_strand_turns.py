"""A strand's turn is bounded: a session whose strand other threads keep busy (jobs posted
faster than they run) does not hold back the other sessions' completions reaped in the
same batch.  The worker holding a busy strand hands it on after a while (the port posts
a wake-up that any worker continues, in order) and goes back to the rest of its batch.
Real sockets, every backend, counters balanced (conftest)."""
import socket
import threading
import time

import iocpnet
from conftest import connect, recv_exactly, wait_for

BOUND = 10.0    # how long the test keeps session A's strand busy at most (generous)


class _Workers:
    """Two threads dispatching the core, each only while its gate is open."""

    def __init__(self, core):
        self.core = core
        self.stop = threading.Event()
        self.gates = [threading.Event(), threading.Event()]
        self.idle = [threading.Event(), threading.Event()]
        self.errors = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in (0, 1)]
        for t in self.threads:
            t.start()

    def _run(self, i):
        try:
            while not self.stop.is_set():
                if not self.gates[i].is_set():
                    self.idle[i].set()
                    self.gates[i].wait(0.05)
                    continue
                self.idle[i].clear()
                if self.core.Dispatch(20) < 0:
                    break
        except BaseException as e:      # surfaced by the test
            self.errors.append(e)
        finally:
            self.idle[i].set()

    def open(self, *which):
        for i in which:
            self.gates[i].set()

    def close_all(self):
        for g in self.gates:
            g.clear()
        for e in self.idle:
            e.clear()
        for e in self.idle:
            assert e.wait(10), "a worker did not park"

    def join(self):
        self.stop.set()
        for g in self.gates:
            g.set()
        for t in self.threads:
            t.join(10)
        assert not any(t.is_alive() for t in self.threads), "a worker did not end"
        assert not self.errors, f"a worker failed: {self.errors!r}"


def test_a_busy_strand_does_not_hold_back_its_batch(backend):
    """Worker 1 reaps A's and B's receives in one batch, A's first.  A's receive starts a
    chain of jobs on A's strand, each posting the next and waiting until the other
    worker has reaped it (so A's queue is never empty when worker 1 looks).  Before the
    fix worker 1 ran A's queue for as long as that lasted and B's receive waited behind
    it (here: until the chain gave up after BOUND seconds).  Now B's OnRecv runs while
    A's chain still goes on, and A's jobs still run one at a time, in order."""
    state = {"k": 0, "order": [], "inside": 0, "overlap": 0, "b_ran_at": None,
             "chain_end": None, "sentinels": 0}
    lock = threading.Lock()
    started = time.monotonic()

    class S(iocpnet.Session):
        def OnConnected(self):
            self.Send(b"R")

        def OnRecv(self, data):
            if bytes(data) == b"A":
                self.chain(0)
            else:
                with lock:
                    state["b_ran_at"] = state["k"] if state["chain_end"] is None else None
                self.Send(bytes(data))

        def chain(self, k):
            with lock:
                state["inside"] += 1
                if state["inside"] > 1:
                    state["overlap"] += 1
                state["order"].append(k)
                state["k"] = k
                go_on = (state["b_ran_at"] is None and
                         time.monotonic() - started < BOUND)
                if not go_on and state["chain_end"] is None:
                    state["chain_end"] = k
            if go_on:
                assert self.Post(self.chain, k + 1)
                # Wait until the other worker has reaped that job (posts complete in
                # order): then it sits on this strand's queue behind this job.
                reaped = threading.Event()

                def sentinel():
                    with lock:
                        state["sentinels"] += 1
                    reaped.set()

                state["core"].Post(sentinel)
                reaped.wait(2)
            with lock:
                state["inside"] -= 1

    core = state["core"] = iocpnet.IocpCore(backend)   # not closed over: S outlives the test
    listener = iocpnet.Listener(("127.0.0.1", 0))
    service = iocpnet.Service(core, listener, S, 4)
    service.Start(0)
    workers = _Workers(core)
    socks = []
    try:
        workers.open(0, 1)
        socks = [connect(("127.0.0.1", listener.port)) for _ in range(2)]
        for s in socks:
            assert recv_exactly(s, 1) == b"R"
        wait_for(lambda: service.session_count == 2)
        workers.close_all()
        # A's data first, then B's, both in the kernel before anyone reaps them.
        socks[0].sendall(b"A")
        time.sleep(0.05)
        socks[1].sendall(b"B")
        time.sleep(0.2)
        dispatch = lambda: service.stats()["dispatch"]["completions"]  # noqa: E731
        before = dispatch()
        started = time.monotonic()
        workers.open(0)
        wait_for(lambda: state["order"] or state["b_ran_at"] is not None, 10,
                 "A's chain or B's receive to start")
        workers.open(1)
        socks[1].settimeout(BOUND + 10)
        assert recv_exactly(socks[1], 1) == b"B"
        wait_for(lambda: state["chain_end"] is not None and state["inside"] == 0,
                 BOUND + 10, "A's chain to end")
        with lock:
            b_ran_at, order, overlap = state["b_ran_at"], list(state["order"]), state["overlap"]
        assert b_ran_at is not None, (
            f"B's receive waited until A's strand was done ({len(order)} jobs, "
            f"{time.monotonic() - started:.1f} s)")
        assert order == list(range(len(order))), "A's jobs ran out of order"
        assert overlap == 0, "two of A's jobs ran at once"
        # Every completion handled is counted, those taken from A's strand's queue
        # included (a wake-up is none): A's jobs, the sentinels, the two receives.
        jobs = len(order) - 1               # chain(0) ran in OnRecv
        wait_for(lambda: state["sentinels"] == jobs, 10, "the sentinels")
        expected = jobs + jobs + 2
        wait_for(lambda: dispatch() - before >= expected, 5,
                 f"dispatch.completions to count {expected} (it has {dispatch() - before})")
    finally:
        for s in socks:
            s.close()
        service.Stop()
        core.Close()
        workers.join()
        state.clear()
