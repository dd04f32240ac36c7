"""One dispatcher: ``Run(workers=1)`` tells the core that one thread dispatches it until it
closes, and io_uring then remakes its ring SINGLE_ISSUER | DEFER_TASKRUN: only that thread
(the first to wait) may enter the kernel.  Everything other threads do must still work:
Send and Disconnect from a user thread while the only worker sleeps in the kernel, a
Dispatch(0) poll from a thread that is not the owner, a listener closed by Stop() on
another thread, Start() on one thread and the dispatching on another.  On epoll (and on
a port already in use) the request is refused and nothing changes; the same behaviour
is asserted there.
"""
import socket
import threading
import time

import pytest

import iocpnet

from conftest import connect, recv_exactly, wait_for


class _Sessions:
    def __init__(self):
        self.lock = threading.Lock()
        self.connected = []
        self.sent = []
        self.disconnected = []


def _echo_class(rec, with_on_send=False):
    class Echo(iocpnet.Session):
        def OnConnected(self):
            with rec.lock:
                rec.connected.append(self)

        def OnRecv(self, data):
            self.Send(bytes(data))

        def OnDisconnected(self, reason):
            with rec.lock:
                rec.disconnected.append(reason)

    if with_on_send:
        class EchoWithOnSend(Echo):
            def OnSend(self, num_bytes):
                with rec.lock:
                    rec.sent.append(num_bytes)
        return EchoWithOnSend
    return Echo


class _OneWorker:
    """A core made single-dispatcher before Start (as Run(workers=1) does), started on
    the calling thread, dispatched by one worker thread of its own."""

    def __init__(self, backend, session_cls, before_worker=None):
        self.core = iocpnet.IocpCore(backend)
        self.service = iocpnet.Service(self.core, iocpnet.Listener(("127.0.0.1", 0)),
                                       session_cls, 4)
        self.single = self.core._single_dispatcher()
        self.service.Start()
        self.errors = []
        if before_worker is not None:
            before_worker(self.core)
        self.worker = threading.Thread(target=self._work, daemon=True)
        self.worker.start()

    def _work(self):
        try:
            while self.core.Dispatch() >= 0:
                pass
        except BaseException as e:
            self.errors.append(e)

    @property
    def address(self):
        return ("127.0.0.1", self.service.listener.port)

    def stop(self):
        self.service.Stop(5)
        self.core.Close(5)
        self.worker.join(5)
        assert not self.worker.is_alive()
        assert not self.errors, self.errors
        st = self.core.stats()
        assert st["in_flight"] == 0 and st["recv_buffers_out"] == 0, st


def _expect_single(backend, single):
    # io_uring on this kernel takes it; epoll has nothing to change.
    assert single == (backend == "io_uring")


@pytest.mark.parametrize("with_on_send", [False, True], ids=["inline", "on_send"])
def test_send_from_a_user_thread_while_the_only_worker_sleeps(backend, with_on_send):
    rec = _Sessions()
    srv = _OneWorker(backend, _echo_class(rec, with_on_send))
    try:
        _expect_single(backend, srv.single)
        c = connect(srv.address)
        assert c.sendall(b"ping") is None and recv_exactly(c, 4) == b"ping"
        wait_for(lambda: rec.connected, 5)
        time.sleep(0.2)                 # the worker is asleep in the kernel again
        session = rec.connected[0]
        for i in range(20):             # from this thread, not the worker's
            session.Send(b"push%02d" % i)
        assert recv_exactly(c, 6 * 20) == b"".join(b"push%02d" % i for i in range(20))
        if with_on_send:
            # Each send went through the port (an SQE the owner submitted for us).
            wait_for(lambda: sum(rec.sent) == 4 + 6 * 20, 5, "OnSend for every byte")
        c.close()
        wait_for(lambda: rec.disconnected, 5)
    finally:
        srv.stop()
        rec.connected.clear()           # the sessions (and through them the core) go


def test_disconnect_from_a_user_thread_while_the_only_worker_sleeps(backend):
    rec = _Sessions()
    srv = _OneWorker(backend, _echo_class(rec))
    try:
        _expect_single(backend, srv.single)
        c = connect(srv.address)
        wait_for(lambda: rec.connected, 5)
        time.sleep(0.2)                 # the worker asleep in the kernel again (unobservable)
        rec.connected[0].Disconnect("from the test thread")
        c.settimeout(5)
        assert c.recv(16) == b""        # the close reached the kernel without a worker poll
        wait_for(lambda: rec.disconnected, 5)
        assert "from the test thread" in str(rec.disconnected[0])
        c.close()
    finally:
        srv.stop()
        rec.connected.clear()           # the sessions (and through them the core) go


def test_dispatch_poll_from_a_thread_that_is_not_the_owner(backend):
    """A thread other than the worker polls Dispatch(0) (and waits with a timeout) while
    clients talk: every call returns (no error, no hang past its timeout) and every
    echo arrives."""
    rec = _Sessions()
    srv = _OneWorker(backend, _echo_class(rec))
    try:
        _expect_single(backend, srv.single)
        clients = [connect(srv.address) for _ in range(4)]
        stop = threading.Event()
        polls = []

        def poller():
            while not stop.is_set():
                polls.append(srv.core.Dispatch(0))
                t0 = time.monotonic()
                polls.append(srv.core.Dispatch(20))
                assert time.monotonic() - t0 < 2

        t = threading.Thread(target=poller)
        t.start()
        try:
            for round_ in range(50):
                for i, c in enumerate(clients):
                    c.sendall(b"m%d-%03d" % (i, round_))
                for i, c in enumerate(clients):
                    assert recv_exactly(c, 6) == b"m%d-%03d" % (i, round_)
        finally:
            stop.set()
            t.join(10)
        assert not t.is_alive()
        assert polls and all(n >= 0 for n in polls)
        for c in clients:
            c.close()
        wait_for(lambda: len(rec.disconnected) == 4, 5)
    finally:
        srv.stop()
        rec.connected.clear()           # the sessions (and through them the core) go


def test_polls_before_the_worker_starts_do_not_take_the_ring(backend):
    """Run(workers=1) starts its worker after Start(): a thread that polls Dispatch(0) or
    waits with a timeout before the worker's first wait (a frame loop, Stop's own drain)
    must not become the one dispatcher.  It did: the worker then waited as a follower,
    nobody entered the ring once the poller stopped, and nothing was ever accepted
    (test_dispatch_poll_from_a_thread_that_is_not_the_owner hung so under load, its
    poller thread starting first)."""
    def polls(core):
        def poll():
            assert core.Dispatch(0) == 0
            assert core.Dispatch(20) == 0
        t = threading.Thread(target=poll)       # a thread that then ends, as the poller
        t.start()
        t.join(5)
        assert core.Dispatch(0) == 0            # and this one, which then sleeps in recv

    rec = _Sessions()
    srv = _OneWorker(backend, _echo_class(rec), before_worker=polls)
    try:
        _expect_single(backend, srv.single)
        with connect(srv.address, timeout=5) as c:
            for i in range(3):
                c.sendall(b"after%d" % i)
                assert recv_exactly(c, 6) == b"after%d" % i
        wait_for(lambda: rec.disconnected, 5)
    finally:
        srv.stop()
        rec.connected.clear()           # the sessions (and through them the core) go


def test_stop_closes_the_listener_from_another_thread_while_the_owner_sleeps(backend):
    rec = _Sessions()
    srv = _OneWorker(backend, _echo_class(rec))
    port = srv.service.listener.port
    try:
        _expect_single(backend, srv.single)
        c = connect(srv.address)
        assert c.sendall(b"x") is None and recv_exactly(c, 1) == b"x"
        time.sleep(0.2)                 # the worker asleep in the kernel again (unobservable)
        srv.service.Stop(5)             # this thread closes the listener and the session
        c.settimeout(5)
        assert c.recv(16) == b""

        def refused():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except ConnectionRefusedError:
                return True
            return False
        wait_for(refused, 5, "the listening socket closed")
        c.close()
    finally:
        srv.stop()
        rec.connected.clear()           # the sessions (and through them the core) go


def test_start_on_one_thread_run_on_another(backend):
    """Run(workers=1) on a thread that is not the main one: Run's thread starts the
    service (its accepts wait in the ring until the owner enables it), the worker Run
    starts owns the ring; echoes and a send from this thread work, Stop() from here
    ends it.  (_OneWorker covers Start() on this thread and a worker of the test's.)"""
    rec = _Sessions()
    core = iocpnet.IocpCore(backend)
    service = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), _echo_class(rec), 4)
    runner = threading.Thread(target=service.Run, kwargs={"workers": 1}, daemon=True)
    runner.start()
    wait_for(lambda: service.listener.port, 5)
    c = connect(("127.0.0.1", service.listener.port))
    for i in range(10):
        c.sendall(b"hello%d" % i)
        assert recv_exactly(c, 6) == b"hello%d" % i
    wait_for(lambda: rec.connected, 5)
    rec.connected[0].Send(b"!")        # a user thread's send, too
    assert recv_exactly(c, 1) == b"!"
    service.Stop(5)
    runner.join(10)
    assert not runner.is_alive()
    c.close()
    rec.connected.clear()


def test_refused_on_a_core_in_use_and_nothing_changes(backend):
    """A core that has submitted operations keeps its ring (the fallback, as when the
    kernel refuses the flags): dispatching from two threads still works."""
    rec = _Sessions()
    core = iocpnet.IocpCore(backend)
    service = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), _echo_class(rec), 4)
    service.Start()
    try:
        assert core._single_dispatcher() is False
        stop = threading.Event()

        def work():
            while not stop.is_set() and core.Dispatch(50) >= 0:
                pass
        threads = [threading.Thread(target=work) for _ in range(2)]
        for t in threads:
            t.start()
        c = connect(("127.0.0.1", service.listener.port))
        for i in range(10):
            c.sendall(b"r%d" % i)
            assert recv_exactly(c, 2) == b"r%d" % i
        c.close()
        wait_for(lambda: rec.disconnected, 5)
    finally:
        service.Stop(5)
        core.Close(5)
        stop.set()
        for t in threads:
            t.join(5)
        rec.connected.clear()


def test_start_with_one_worker_gives_it_the_ring(backend):
    """Service.Start(workers=1): the handle's one worker owns the ring, as with Run; a
    user thread's Send and Disconnect work while it sleeps; Stop() ends it all."""
    rec = _Sessions()
    core = iocpnet.IocpCore(backend)
    service = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), _echo_class(rec), 4)
    with service.Start(workers=1) as handle:
        assert core._single_dispatcher() is False    # taken (io_uring) or refused (epoll)
        c = connect(handle.address)
        c.sendall(b"abc")
        assert recv_exactly(c, 3) == b"abc"
        wait_for(lambda: rec.connected, 5)
        time.sleep(0.2)                 # the worker asleep in the kernel again (unobservable)
        rec.connected[0].Send(b"from-user")
        assert recv_exactly(c, 9) == b"from-user"
        rec.connected[0].Disconnect("bye")
        c.settimeout(5)
        assert c.recv(16) == b""
        c.close()
    assert not handle.running
    rec.connected.clear()


def test_client_service_start_with_one_worker(backend):
    """ClientService.Start(workers=1) connects from the owner ring: its sessions talk to
    a plain server, and a Send from this thread while the worker sleeps arrives."""
    rec = _Sessions()
    ls = socket.create_server(("127.0.0.1", 0))
    core = iocpnet.IocpCore(backend)
    clients = iocpnet.ClientService(core, ls.getsockname()[:2], _echo_class(rec), 1)
    handle = clients.Start(workers=1)
    try:
        ls.settimeout(5)
        peer, _ = ls.accept()
        peer.settimeout(5)
        wait_for(lambda: rec.connected, 5)
        time.sleep(0.2)                 # the worker asleep in the kernel again (unobservable)
        rec.connected[0].Send(b"hello")
        assert recv_exactly(peer, 5) == b"hello"
        peer.sendall(b"echo")                        # the session echoes it back
        assert recv_exactly(peer, 4) == b"echo"
        peer.close()
        wait_for(lambda: rec.disconnected, 5)
    finally:
        handle.Stop(5)
        ls.close()
        rec.connected.clear()


def test_receive_buffers_given_back_by_a_batch_come_back_at_its_end(backend):
    """The one worker holds back the receive buffers a batch gives back and returns them
    to the ring together when the batch ends (io_uring; DEFER_TASKRUN: the kernel takes
    none before that worker's next wait).  On a pool of 4 buffers, 20 pipelining clients
    need every buffer back after each batch: each echo exact, views kept by some
    sessions exact, and once idle none is out and the pool never grew."""
    kept = []

    class Echo(iocpnet.Session):
        def OnRecv(self, data):
            self.Send(bytes(data))
            if data[0] == ord("k"):
                kept.append((bytes(data), data))     # a view kept past its hook

    core = iocpnet.IocpCore(backend, recv_buffer_count=4)
    service = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), Echo, 20)
    _expect_single(backend, core._single_dispatcher())
    service.Start()
    errors = []

    def work():
        try:
            core._work()    # Run's worker loop: a batch ends with the next wait
        except BaseException as e:
            errors.append(e)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    clients = [connect(("127.0.0.1", service.listener.port)) for _ in range(20)]
    try:
        for rnd in range(5):
            want = []
            for i, c in enumerate(clients):
                tag = b"k" if (i + rnd) % 5 == 0 else b"m"
                msgs = b"".join(tag + b"%03d-%02d-%02d" % (rnd, i, j) + b"." * 52
                                for j in range(16))
                want.append(msgs)
                c.sendall(msgs)
            for c, msgs in zip(clients, want):
                assert recv_exactly(c, len(msgs)) == msgs, f"round {rnd}"
        assert kept and all(bytes(v) == b for b, v in kept)
        wait_for(lambda: core.stats()["recv_buffers_out"] == 0, 5)
        assert core.stats()["recv_buffers"] <= 4, core.stats()
    finally:
        for c in clients:
            c.close()
        service.Stop(5)
        core.Close(5)
        worker.join(5)
    assert not worker.is_alive() and not errors, errors
    st = core.stats()
    assert st["in_flight"] == 0 and st["recv_buffers_out"] == 0, st
    kept.clear()      # (free-threaded 3.13 never frees the class, nor what it refers to)
