"""The run handle (Service.Start(workers=N), a context manager with .port and .Stop()),
Run(seconds=...), and ClientService factories given the session's index."""
import gc
import os
import signal
import socket
import threading
import time

import pytest

import iocpnet
from conftest import connect, recv_exactly, wait_for
from subproc import Proc


class Echo(iocpnet.Session):
    def OnRecv(self, data):
        self.Send(data)


def _workers():
    return [t for t in threading.enumerate() if t.name.startswith("iocpnet-worker")]


def test_start_with_workers_returns_a_handle_at_once(backend):
    core = iocpnet.IocpCore(backend)
    service = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), Echo, 8)
    with service.Start(workers=2) as run:
        assert isinstance(run, iocpnet.RunHandle)
        assert run.port == service.listener.port and run.port > 0
        assert run.address == ("127.0.0.1", run.port)
        assert run.running and run.workers == 2
        assert len(_workers()) == 2
        c = connect(("127.0.0.1", run.port))
        c.sendall(b"ping")
        assert recv_exactly(c, 4) == b"ping"
        with pytest.raises(RuntimeError):
            service.Start()
    # Leaving the block: the service stopped, the core closed, the workers joined.
    assert not run.running and core.closed
    assert c.recv(1) == b""
    assert _workers() == []
    run.Stop()            # idempotent
    c.close()


def test_start_without_workers_leaves_the_core_to_the_caller(backend):
    core = iocpnet.IocpCore(backend)
    service = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), Echo, 8)
    run = service.Start()
    assert run.workers == 0 and run.port > 0
    stop = threading.Event()

    def loop():
        while not stop.is_set() and core.Dispatch(20) >= 0:
            pass

    t = threading.Thread(target=loop)
    t.start()
    c = connect(("127.0.0.1", run.port))
    c.sendall(b"x")
    assert recv_exactly(c, 1) == b"x"
    run.Stop()
    assert service.session_count == 0 and not core.closed
    stop.set()
    t.join()
    core.Close()
    c.close()
    with pytest.raises(ValueError):
        iocpnet.Service(core, iocpnet.Listener(0), Echo).Start(workers=-1)


def test_run_for_some_seconds(backend):
    core = iocpnet.IocpCore(backend)
    service = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), Echo, 8)
    t0 = time.monotonic()
    service.Run(workers=1, seconds=0.3)
    took = time.monotonic() - t0
    assert 0.25 <= took < 5, took
    assert core.closed and _workers() == []


def test_client_factory_gets_the_session_index_kept_across_reconnects(backend):
    seen = []

    class Bot(iocpnet.Session):
        def __init__(self, index):
            self.index = index

        def OnConnected(self):
            seen.append(("up", self.index))
            if self.index == 2 and sum(1 for e in seen if e == ("up", 2)) == 1:
                self.Disconnect("drop once")     # replaced, with the same index

    core = iocpnet.IocpCore(backend)
    server = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), Echo, 16)
    with server.Start(workers=2) as run:
        bots = iocpnet.ClientService(core, ("127.0.0.1", run.port), Bot, 4,
                                     reconnect=iocpnet.Reconnect(initial=0.01))
        client_run = bots.Start()
        assert client_run.port is None and client_run.address == ("127.0.0.1", run.port)
        # Bot 2 may drop and come back before another bot's first connect (two
        # workers, a 10 ms reconnect): wait for all five, in whatever order.
        wait_for(lambda: len(seen) >= 5, message="four bots and one reconnect")
        assert sorted(i for _, i in seen) == [0, 1, 2, 2, 3]
        assert seen.count(("up", 2)) == 2
        extra = bots.Connect()
        assert extra.index == 4
        # A factory that takes no argument is called without one.
        plain = iocpnet.ClientService(core, ("127.0.0.1", run.port), Echo, 1)
        plain.Start()
        wait_for(lambda: plain.session_count == 1 and plain.sessions[0].connected)
        bots.Stop()
        plain.Stop()


def test_stop_from_a_hook_then_from_main_waits_for_all_of_it(backend):
    """A hook calls handle.Stop() (it cannot wait for itself); the main thread's own
    Stop() afterwards returned at once, while the session was still ending, the core
    open and the workers running.  It must wait for all of it."""
    ended = []
    box = {}

    class Quit(iocpnet.Session):
        def OnRecv(self, data):
            box["run"].Stop()
            self.Send(b"bye")

        def OnDisconnected(self, reason):
            time.sleep(0.3)          # saving the player's state, say
            ended.append(reason)

    core = iocpnet.IocpCore(backend)
    service = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), Quit, 8)
    run = box["run"] = service.Start(workers=2)
    c = connect(("127.0.0.1", run.port))
    c.sendall(b"quit")
    assert recv_exactly(c, 3) == b"bye"
    run.Stop()
    assert ended == ["server shutdown"]
    assert core.closed and _workers() == [] and not run.running
    c.close()
    box.clear()


def test_timeouts_that_are_nan_are_refused(backend):
    """Run(seconds=nan) ran forever (no comparison with NaN is true, so its end never
    came); Stop(nan) and Close(nan) waited with no deadline whatever a hook did."""
    nan = float("nan")
    core = iocpnet.IocpCore(backend)
    service = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), Echo, 8)
    outcome = []

    def run(**kw):
        try:
            service.Run(workers=1, **kw)
            outcome.append("returned")
        except ValueError as e:
            outcome.append(e)

    for kw in ({"seconds": nan}, {"seconds": 0.1, "shutdown_timeout": nan}):
        t = threading.Thread(target=run, kwargs=kw)
        t.start()
        t.join(5)
        if t.is_alive():
            service.Stop()
            t.join()
        assert len(outcome) == 1 and isinstance(outcome[0], ValueError), (kw, outcome)
        outcome.clear()
    assert not core.closed
    handle = service.Start(workers=1)
    for stop in (service.Stop, handle.Stop, core.Close):
        with pytest.raises(ValueError):
            stop(nan)
    assert handle.running and not core.closed
    c = connect(("127.0.0.1", handle.port))
    c.sendall(b"still here")
    assert recv_exactly(c, 10) == b"still here"
    handle.Stop()
    assert core.closed
    c.close()


_CTRL_C_SCRIPT = """
import sys, time
import iocpnet

class Stuck(iocpnet.Session):
    def OnRecv(self, data):
        print("in the hook", flush=True)
        time.sleep(60)

core = iocpnet.IocpCore(sys.argv[1])
service = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), Stuck, 8)
run = service.Start(workers=2)
try:
    with run:
        # Said inside the block: a Ctrl-C before it would not be this test's case.
        print("listening on port", run.port, flush=True)
        while True:
            time.sleep(0.05)
except KeyboardInterrupt:
    print("interrupted: core", repr(core).split()[-1][:-1], "running", run.running,
          flush=True)
"""


def test_ctrl_c_while_stop_waits_stops_at_once(backend):
    """The idiom ``with service.Start(workers=2): ...`` ended by Ctrl-C: __exit__ waits
    for the sessions; a second Ctrl-C meanwhile (a hook holds the shutdown up) raised
    KeyboardInterrupt out of Stop() half-way: the core left open, the workers running.
    Like Run's second signal, it now stops at once (what is open reset, the workers not
    in a hook gone, the core closing: it closes once the hook returns, see
    test_a_hook_that_outlives_the_shutdown_leaks_nothing_once_it_returns) and the
    KeyboardInterrupt goes on."""
    with Proc.python("-c", _CTRL_C_SCRIPT, backend) as p:
        port = p.port(r"listening on port (\d+)")
        with connect(("127.0.0.1", port), timeout=30) as c, \
                connect(("127.0.0.1", port), timeout=30) as idle:
            c.sendall(b"x")
            p.wait_for_line(r"in the hook")
            p.signal(signal.SIGINT)          # the with block ends: a graceful Stop
            # Sent before the child ran its handler, the second SIGINT would merge with
            # the first (a fixed 0.5 s was too short under load): wait until Stop has
            # begun, which closes the listener first.
            wait_for(lambda: refuses(port), 30, "the graceful Stop to close the listener")
            p.signal(signal.SIGINT)          # impatient: stop now
            (m,) = p.wait_for_line(r"interrupted: core (\w+) running (\w+)")
            assert m.groups() == ("closing", "False"), p.output
            assert closed_or_reset(idle)
        assert p.wait(30) == 0, p.output


def refuses(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except (ConnectionRefusedError, ConnectionResetError):
        return True       # reset: the listener closed with this connection in its queue
    return False


def closed_or_reset(sock):
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("workers", [1, 2])
def test_a_hook_that_outlives_the_shutdown_leaks_nothing_once_it_returns(backend, workers):
    """Run(workers=N, shutdown_timeout=0.5) with a hook that blocks until Run has
    returned: Run returns at its deadline with that worker still in the hook (warned;
    the other worker leaves); once the hook returns, what it sent is flushed,
    OnDisconnected runs once, the worker ends, the core closes, and the session, the
    accepts, the core and their sockets are released (the autouse leak check counts
    them): a process that runs services one after another leaks nothing."""
    in_hook = threading.Event()
    release = threading.Event()
    ended = []

    class Block(iocpnet.Session):
        def OnRecv(self, data):
            in_hook.set()
            release.wait(10)
            self.Send(b"late")

        def OnDisconnected(self, reason):
            ended.append(reason)

    fds_before = len(os.listdir("/proc/self/fd"))
    core = iocpnet.IocpCore(backend)
    service = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), Block, 4)
    box = {}

    def poke():
        wait_for(lambda: service.listener.port, message="the listener")
        box["c"] = c = connect(("127.0.0.1", service.listener.port))
        c.sendall(b"x")
        in_hook.wait(10)
        service.Stop(0)                       # Run's shutdown begins, the hook runs on

    t = threading.Thread(target=poke)
    t.start()
    service.Run(workers=workers, shutdown_timeout=0.5)
    t.join()
    assert in_hook.is_set() and not core.closed
    wait_for(lambda: len(_workers()) == 1, message="the workers not in the hook to leave")
    release.set()
    wait_for(lambda: _workers() == [], message="the worker to leave its hook and end")
    assert core.closed and core.stats()["in_flight"] == 0
    assert service.session_count == 0 and service.listener.accepts_posted == 0
    assert ended == ["server shutdown"]       # exactly once, after the hook
    c = box.pop("c")
    c.settimeout(5)
    assert recv_exactly(c, 4) == b"late" and c.recv(1) == b""    # flushed, then closed
    c.close()
    del service, core
    wait_for(lambda: (gc.collect(), len(os.listdir("/proc/self/fd")))[1] <= fds_before,
             message="the port's and the sessions' descriptors to be closed")
