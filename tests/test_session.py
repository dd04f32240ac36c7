"""Session semantics: hooks, Send, Disconnect, limits, errors, threads."""
import asyncio
import inspect
import logging
import socket
import struct
import threading
import time

import pytest

import iocpnet

from conftest import connect, recv_exactly, recv_until_eof, wait_for


class Echo(iocpnet.Session):
    def OnRecv(self, data):
        self.Send(data)


def make_echo(recorder):
    class RecordingEcho(Echo):
        def OnConnected(self):
            recorder.add("connected", self.address)

        def OnDisconnected(self, reason):
            recorder.on_disconnected(self, reason)

    return RecordingEcho


def test_200_concurrent_clients(server):
    srv = server(Echo, workers=2, accepts=64)

    async def client(i):
        reader, writer = await asyncio.open_connection(*srv.address)
        for k in range(5):
            msg = f"client {i} message {k} ".encode() * (i % 7 + 1)
            writer.write(msg)
            assert await reader.readexactly(len(msg)) == msg
        writer.close()
        await writer.wait_closed()

    async def main():
        await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(200))), 60)

    asyncio.run(main())
    wait_for(lambda: srv.service.session_count == 0, message="all sessions to end")
    assert srv.service.total_sessions == 200


def test_live_sessions_follow_connects_and_disconnects(server):
    """Service.sessions / session_count are the connected sessions, whatever order they
    come and go in (the live list is threaded through the sessions), and a session that
    ended is released by it: nothing keeps it alive."""
    import gc
    import weakref

    made = []

    class Tracked(Echo):
        def OnConnected(self):
            made.append(weakref.ref(self))

    srv = server(Tracked, workers=2, accepts=16)
    clients = [connect(srv.address) for _ in range(30)]
    try:
        for c in clients:              # one round trip each: connected on the server
            c.sendall(b"x")
            assert recv_exactly(c, 1) == b"x"
        wait_for(lambda: srv.service.session_count == 30)
        live = srv.service.sessions
        assert len(live) == 30 and len(set(map(id, live))) == 30
        assert {id(r()) for r in made} == set(map(id, live))
        del live
        # Close the middle, the first and the last ones the list holds, then the rest.
        for i in (15, 0, 29, 7, 8, 22):
            clients[i].close()
        wait_for(lambda: srv.service.session_count == 24)
        assert len(srv.service.sessions) == 24
        assert sum(r() is not None and r() in srv.service.sessions for r in made) == 24
    finally:
        for c in clients:
            c.close()
    wait_for(lambda: srv.service.session_count == 0, message="all sessions to end")
    assert srv.service.sessions == []
    gc.collect()
    wait_for(lambda: all(r() is None for r in made), message="every session to be freed")


@pytest.mark.parametrize("size", [1, 1000, 64 * 1024 + 3, 1024 * 1024, 4 * 1024 * 1024])
def test_message_sizes(server, size):
    """From 1 byte to 4 MiB: receives arrive in pieces, sends complete partially."""
    srv = server(Echo)
    payload = bytes((i * 7 + size) & 0xFF for i in range(min(size, 65536)))
    payload = (payload * (size // len(payload) + 1))[:size]
    with connect(srv.address, timeout=30) as c:
        sender = threading.Thread(target=c.sendall, args=(payload,))
        sender.start()
        echoed = recv_exactly(c, size)
        sender.join()
    assert echoed == payload


class LineSession(iocpnet.Session):
    """Consumes only complete lines; the rest must be shown again with the next bytes."""
    lines = None

    def OnRecv(self, data):
        raw = bytes(data)
        end = raw.rfind(b"\n")
        if end < 0:
            return 0
        for line in raw[:end].split(b"\n"):
            self.lines.append(line)
            self.Send(line.upper() + b"\n")
        return end + 1


def test_onrecv_partial_consumption_across_dribbled_writes(server):
    lines = []
    cls = type("Lines", (LineSession,), {"lines": lines})
    srv = server(cls)
    text = b"first line\nsecond\nthe third one is longer\n"
    with connect(srv.address) as c:
        for i in range(len(text)):         # one byte at a time
            c.sendall(text[i:i + 1])
            time.sleep(0.001)
        assert recv_exactly(c, len(text)) == text.upper()
    assert lines == [b"first line", b"second", b"the third one is longer"]


def test_send_from_a_non_worker_thread(server):
    sessions = []
    ready = threading.Event()

    class Pusher(iocpnet.Session):
        def OnConnected(self):
            sessions.append(self)
            ready.set()

    srv = server(Pusher)
    with connect(srv.address) as c:
        assert ready.wait(10)
        s = sessions.pop()
        expected = b"".join(b"%06d" % i for i in range(2000))

        def push():
            for i in range(2000):
                assert s.Send(b"%06d" % i)

        threads = [threading.Thread(target=push)]
        threads[0].start()
        threads[0].join()
        assert recv_exactly(c, len(expected)) == expected
        del s


def test_server_side_disconnect(server, recorder):
    class Quitter(Echo):
        def OnRecv(self, data):
            if bytes(data).strip() == b"quit":
                self.Send(b"bye\n")
                assert self.Disconnect("client asked to quit")
                assert not self.Disconnect("again")          # idempotent
                assert not self.Send(b"late")               # nothing after Disconnect
                return None
            self.Send(data)

        def OnDisconnected(self, reason):
            recorder.on_disconnected(self, reason)

    srv = server(Quitter)
    with connect(srv.address) as c:
        c.sendall(b"hello\n")
        assert recv_exactly(c, 6) == b"hello\n"
        c.sendall(b"quit\n")
        assert recv_until_eof(c) == b"bye\n"      # queued data flushed, then EOF
    recorder.wait_disconnects(1)
    assert recorder.disconnected == [("Quitter", "client asked to quit")]


class _StrRaises:
    def __str__(self):
        raise RuntimeError("no text for you")


# (call, its argument, the reason OnDisconnected gets)
_REASONS = [
    ("Disconnect", None, "disconnected"),          # was "None"
    ("Abort", None, "aborted"),                    # was "None"
    ("Disconnect", "", "disconnected"),            # was ""
    ("Disconnect", 42, "42"),
    ("Disconnect", ValueError("bad move"), "bad move"),
    ("Abort", ValueError(), "ValueError"),         # was ""
    ("Disconnect", _StrRaises(), "_StrRaises"),    # raised in the hook
]


def test_a_careless_disconnect_reason_still_reads(server, recorder, caplog_iocpnet):
    # Disconnect(None) ended the session with the reason "None", an empty reason or
    # an exception without a message gave "", and a reason whose str() raised made
    # the hook that called Disconnect raise instead of ending the session.
    class Careless(iocpnet.Session):
        def OnRecv(self, data):
            call, arg, _ = _REASONS[bytes(data)[0]]
            assert getattr(self, call)(arg)

        def OnDisconnected(self, reason):
            recorder.on_disconnected(self, reason)

    srv = server(Careless)
    for i in range(len(_REASONS)):
        with connect(srv.address) as c:
            c.sendall(bytes([i]))
            try:
                recv_until_eof(c)
            except ConnectionResetError:
                pass                                   # Abort
            recorder.wait_disconnects(i + 1)
    assert [r for _, r in recorder.disconnected] == [want for _, _, want in _REASONS]
    raised = [r.getMessage() for r in caplog_iocpnet.records if "raised" in r.getMessage()]
    assert not raised, raised


def test_disconnect_with_unread_input_still_ends_with_a_fin(server):
    """Input the server never read is dropped before the close: a socket closed with
    unread input sends a reset, and the peer's kernel would report it instead of the
    end of the stream (the close skips that only once the peer's FIN or reset came)."""
    sent = threading.Event()

    class Bye(iocpnet.Session):
        def OnConnected(self):
            sent.wait(10)           # the client's bytes are in the socket, unread
            time.sleep(0.05)
            self.Send(b"bye")
            self.Disconnect("done")

    srv = server(Bye)
    with connect(srv.address) as c:
        c.sendall(b"never read")
        sent.set()
        assert recv_until_eof(c) == b"bye"       # a FIN, not ECONNRESET


def test_disconnect_from_another_thread(server, recorder):
    sessions = []

    class Held(Echo):
        def OnConnected(self):
            sessions.append(self)

        def OnDisconnected(self, reason):
            recorder.on_disconnected(self, reason)

    srv = server(Held)
    with connect(srv.address) as c:
        wait_for(lambda: sessions, message="the session")
        s = sessions.pop()
        results = []
        threads = [threading.Thread(target=lambda: results.append(s.Disconnect("kicked")))
                   for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count(True) == 1
        assert recv_until_eof(c) == b""
        del s
    recorder.wait_disconnects(1)
    assert recorder.disconnected == [("Held", "kicked")]


def test_peer_close_gives_one_ondisconnected(server, recorder):
    srv = server(make_echo(recorder))
    for _ in range(3):
        with connect(srv.address) as c:
            c.sendall(b"x")
            assert recv_exactly(c, 1) == b"x"
    recorder.wait_disconnects(3)
    time.sleep(0.1)                 # a second OnDisconnected's chance to come: none must
    assert [r for _, r in recorder.disconnected] == ["peer closed the connection"] * 3


def test_peer_reset_gives_one_ondisconnected(server, recorder):
    srv = server(make_echo(recorder))
    c = connect(srv.address)
    c.sendall(b"x")
    assert recv_exactly(c, 1) == b"x"
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()                                  # RST
    recorder.wait_disconnects(1)
    time.sleep(0.1)                 # a second OnDisconnected's chance to come: none must
    assert len(recorder.disconnected) == 1
    assert recorder.disconnected[0][1] == "connection reset by peer"


def test_half_close_flushes_queued_data(server, recorder):
    """The peer shuts down its side: what Send queued still goes out, then EOF."""
    srv = server(make_echo(recorder))
    with connect(srv.address) as c:
        payload = b"0123456789" * 100_000          # 1 MB, more than the socket buffers
        sender = threading.Thread(target=lambda: (c.sendall(payload),
                                                  c.shutdown(socket.SHUT_WR)))
        sender.start()
        echoed = recv_until_eof(c)
        sender.join()
    assert echoed == payload
    recorder.wait_disconnects(1)
    assert recorder.disconnected[0][1] == "peer closed the connection"


def test_raising_hook_closes_only_its_session(server, recorder, caplog_iocpnet):
    class Fragile(Echo):
        def OnRecv(self, data):
            if bytes(data) == b"boom":
                raise ValueError("bad packet")
            self.Send(data)

        def OnDisconnected(self, reason):
            recorder.on_disconnected(self, reason)

    srv = server(Fragile)
    with connect(srv.address) as good, connect(srv.address) as bad:
        good.sendall(b"ok")
        assert recv_exactly(good, 2) == b"ok"
        bad.sendall(b"boom")
        assert recv_until_eof(bad) == b""
        recorder.wait_disconnects(1)
        good.sendall(b"still here")
        assert recv_exactly(good, 10) == b"still here"
    assert recorder.disconnected[0] == ("Fragile", "exception in OnRecv: ValueError: bad packet")
    logged = [r for r in caplog_iocpnet.records if "OnRecv" in r.getMessage()]
    assert logged and logged[0].exc_info and logged[0].levelno == logging.ERROR


@pytest.mark.parametrize("returned, reason", [
    (lambda data: len(data) + 5, "OnRecv returned 9, but it was given 4 bytes"),
    # "return True" (meaning "handled") is an int to Python: it consumed one byte and
    # left the rest waiting for bytes that never come, with no word in the log
    (lambda data: True, "OnRecv returned True: return the number of bytes consumed"),
], ids=["too_many", "bool"])
def test_onrecv_bad_return_value_disconnects_with_a_clear_reason(server, recorder,
                                                                 returned, reason):
    class Liar(Echo):
        def OnRecv(self, data):
            self.Send(bytes(data))
            return returned(data)

        def OnDisconnected(self, reason):
            recorder.on_disconnected(self, reason)

    srv = server(Liar)
    with connect(srv.address) as c:
        c.sendall(b"abcd")
        assert recv_until_eof(c) == b"abcd"
    recorder.wait_disconnects(1)
    assert reason in recorder.disconnected[0][1], recorder.disconnected[0][1]


def test_send_queue_limit_disconnects_a_peer_that_does_not_read(server, recorder):
    class Flood(iocpnet.Session):
        send_queue_limit = 256 * 1024

        def OnConnected(self):
            chunk = b"z" * 16384
            while self.Send(chunk):
                pass

        def OnDisconnected(self, reason):
            recorder.on_disconnected(self, reason)

    srv = server(Flood)
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # before the handshake
    try:
        c.connect(srv.address)                                # and never read
    except ConnectionResetError:
        pass                      # the server's reset can beat connect() back to us
    recorder.wait_disconnects(1)
    reason = recorder.disconnected[0][1]
    assert reason.startswith("send queue limit exceeded")
    assert "send_queue_limit is 262144" in reason
    c.close()


def test_send_timeout_zero_turns_the_stall_check_off(server, recorder):
    """Two peers that never read, each sent 8 MiB (more than the kernel's buffers
    take, so the send queue stays busy): the session whose class has send_timeout =
    0.3 is cut for the stall; the one with send_timeout = 0 is still connected well
    after; a negative send_timeout is refused when the class is first used."""
    class Pusher(iocpnet.Session):
        send_queue_limit = 16 << 20

        def OnConnected(self):
            self.Send(b"p" * (8 << 20))

        def OnDisconnected(self, reason):
            recorder.on_disconnected(self, reason)

    class Strict(Pusher):
        send_timeout = 0.3

    class Off(Pusher):
        send_timeout = 0

    made = []

    def factory():
        made.append(len(made))
        return Strict() if len(made) % 2 else Off()

    srv = server(factory, accepts=1)
    peers = []
    for _ in range(2):
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.connect(srv.address)
        peers.append(c)
    recorder.wait_disconnects(1)
    time.sleep(1.0)                               # three times the strict timeout
    assert [r for _, r in recorder.disconnected] == [
        "send stalled: %d bytes queued, nothing sent for 0.3 s (the peer is not reading)"
        % int(recorder.disconnected[0][1].split()[2])]
    assert recorder.disconnected[0][0] == "Strict"
    assert srv.service.session_count == 1 and srv.service.send_timeouts == 1
    for c in peers:
        c.close()

    class Negative(iocpnet.Session):
        send_timeout = -1

    with pytest.raises(ValueError, match="send_timeout must be >= 0"):
        Negative()


def test_a_stricter_send_timeout_keeps_its_sweep_when_a_looser_service_restarts_it(server):
    """Two services on one core, send_timeout 10 s and 0.2 s: the sweep runs every 50 ms
    (the shorter's quarter).  Once every session ended it stops; when a session of the
    looser service started it again it ran every 500 ms, and a peer of the stricter one
    that never reads was cut 0.5-1.0 s after its stall instead of within ~0.25 s (the
    stricter service's connects see the sweep running and ask nothing)."""
    ended = []

    class Loose(iocpnet.Session):
        send_timeout = 10

    class Strict(iocpnet.Session):
        send_timeout = 0.2
        send_queue_limit = 16 << 20

        def OnRecv(self, data):
            self.Send(b"p" * (8 << 20))

        def OnDisconnected(self, reason):
            ended.append((time.monotonic(), reason))

    srv = server(Strict)
    listener = iocpnet.Listener(("127.0.0.1", 0))
    loose = iocpnet.Service(srv.core, listener, Loose, 2)
    loose.Start()
    try:
        connect(srv.address).close()               # starts the sweep at 50 ms
        wait_for(lambda: ended, message="the first strict session ended")
        time.sleep(0.3)                            # the sweep found nobody: stopped
        keep = connect(("127.0.0.1", listener.port))   # starts it again
        wait_for(lambda: loose.session_count == 1, message="the loose session")
        ticks = []                 # how late this core's timers run (the sweep is one)
        probe = srv.core.CallEvery(0.05, lambda: ticks.append(time.monotonic()))
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.connect(srv.address)
        c.sendall(b"go")
        t0 = time.monotonic()
        wait_for(lambda: len(ended) == 2, 5, "the peer that never reads cut")
        probe.Cancel()
        late = ended[1][0] - t0
        lag = max([b - a - 0.05 for a, b in zip(ticks, ticks[1:])] or [0.0])
        assert ended[1][1].startswith("send stalled: "), ended[1][1]
        # 0.2 s and a 50 ms period: 0.25 s; the 500 ms period cut at 0.5 s at the soonest
        assert late < 0.45 + lag, (f"cut {late:.2f} s after the stall (send_timeout 0.2 s; "
                                   f"the core's timers lagged up to {lag:.2f} s)")
        c.close()
        keep.close()
    finally:
        loose.Stop(5)


def test_the_send_timeout_sweep_slows_down_once_the_short_timeouts_have_gone(server):
    """A session with send_timeout 0.2 s makes the sweep run every 50 ms.  Once it had
    gone, the sweep kept that period for as long as any session stayed (here one with
    send_timeout 10 s, idle): 20 wake-ups a second, each looking at every session, where
    the sessions left want 2.  Counted as the core's completions while nothing else
    happens (timers run late on a loaded machine, never early: a count only falls)."""
    class Loose(iocpnet.Session):
        send_timeout = 10

    class Strict(iocpnet.Session):
        send_timeout = 0.2

    srv = server(Loose)
    listener = iocpnet.Listener(("127.0.0.1", 0))
    strict = iocpnet.Service(srv.core, listener, Strict, 2)
    strict.Start()
    try:
        keep = connect(srv.address)
        wait_for(lambda: srv.service.session_count == 1, message="the loose session")
        c = connect(("127.0.0.1", listener.port))
        wait_for(lambda: strict.session_count == 1, message="the strict session")
        time.sleep(0.2)                            # swept at 50 ms meanwhile
        c.close()
        wait_for(lambda: strict.session_count == 0, message="the strict session's end")
        time.sleep(1.2)                            # a sweep or two finds it gone
        # The sweep's period, read as the completions of a 2 s window: every 50 ms is
        # ~40 of them, every 500 ms 4 (the loose session's own period).
        before = srv.core.stats()["completed"]
        time.sleep(2.0)
        woke = srv.core.stats()["completed"] - before
        assert woke < 10, f"{woke} completions in 2 s on an idle server (swept every 50 ms?)"
        keep.close()
    finally:
        strict.Stop(5)


def test_recv_buffer_limit_disconnects_a_hook_that_never_consumes(server, recorder):
    class Hoarder(iocpnet.Session):
        recv_buffer_limit = 8192

        def OnRecv(self, data):
            return 0

        def OnDisconnected(self, reason):
            recorder.on_disconnected(self, reason)

    srv = server(Hoarder)
    with connect(srv.address) as c:
        try:
            c.sendall(b"a" * 100_000)
        except OSError:
            pass
        recorder.wait_disconnects(1)
    assert recorder.disconnected[0][1].startswith("receive buffer full")


def test_kept_memoryview_stays_valid(server):
    """A hook that keeps the memoryview it was given never sees reused memory."""
    kept = []

    class Keeper(iocpnet.Session):
        def OnRecv(self, data):
            kept.append(data)                 # keep the view itself
            self.Send(b"k")

    srv = server(Keeper)
    with connect(srv.address) as c:
        for i in range(20):
            c.sendall(bytes([65 + i]) * 1000)
            assert recv_exactly(c, 1) == b"k"
    joined = b"".join(bytes(v) for v in kept)
    assert joined == b"".join(bytes([65 + i]) * 1000 for i in range(20))
    kept.clear()


def test_five_workers(server):
    srv = server(Echo, workers=5, accepts=32)
    seen_threads = set()

    async def client(i):
        reader, writer = await asyncio.open_connection(*srv.address)
        for k in range(20):
            msg = b"%d:%d;" % (i, k)
            writer.write(msg)
            assert await reader.readexactly(len(msg)) == msg
        writer.close()
        await writer.wait_closed()

    async def main():
        await asyncio.gather(*(client(i) for i in range(50)))

    asyncio.run(main())
    assert all(t.is_alive() for t in srv.threads)


def test_one_session_hooks_never_overlap(server):
    """Completions of one session are handled one at a time, whatever the workers."""
    overlap = []

    class Checked(iocpnet.Session):
        busy = False

        def _enter(self):
            if self.busy:
                overlap.append(True)
            self.busy = True

        def OnRecv(self, data):
            self._enter()
            time.sleep(0.0005)
            self.Send(data)
            self.busy = False

        def OnSend(self, n):
            self._enter()
            time.sleep(0.0005)
            self.busy = False

    srv = server(Checked, workers=5)
    with connect(srv.address) as c:
        for i in range(200):
            c.sendall(b"m%d" % i)
        expected = b"".join(b"m%d" % i for i in range(200))
        assert recv_exactly(c, len(expected)) == expected
    assert not overlap


def test_stop_with_io_in_flight_ends_workers(backend, recorder):
    from conftest import Server

    srv = Server(make_echo(recorder), backend, workers=3).start()
    clients = [connect(srv.address) for _ in range(20)]
    stop = threading.Event()

    def blast(c):
        try:
            while not stop.is_set():
                c.sendall(b"y" * 4096)
        except OSError:
            pass

    def drain(c):
        try:
            while c.recv(65536):
                pass
        except OSError:
            pass

    threads = [threading.Thread(target=f, args=(c,)) for c in clients for f in (blast, drain)]
    for t in threads:
        t.start()
    wait_for(lambda: srv.service.session_count == 20, message="20 sessions")
    time.sleep(0.2)                # traffic flowing: Stop meets I/O in flight
    srv.stop()                     # asserts workers ended, nothing in flight
    stop.set()
    for c in clients:
        c.close()
    for t in threads:
        t.join(10)
    assert len(recorder.disconnected) == 20
    assert {r for _, r in recorder.disconnected} <= {
        "server shutdown", "server shutdown (its queued data was not flushed in time)"}


def test_address_and_connected(server):
    info = {}

    class Inspect(iocpnet.Session):
        def OnConnected(self):
            info["address"] = self.address
            info["connected"] = self.connected

        def OnDisconnected(self, reason):
            info["after"] = self.connected

    srv = server(Inspect)
    with connect(srv.address) as c:
        local = c.getsockname()
        wait_for(lambda: "address" in info, message="OnConnected")
    wait_for(lambda: "after" in info, message="OnDisconnected")
    assert info == {"address": ("127.0.0.1", local[1]), "connected": True, "after": False}


def test_address_first_asked_after_the_session_ended(server):
    """The peer address is kept packed and the (host, port) tuple made on first use: a
    server that only asks once the socket is closed (logging a departure) still gets
    it, and threads asking at once all get the one tuple."""
    ended = []

    class Quiet(iocpnet.Session):
        def OnDisconnected(self, reason):
            ended.append(self)

    srv = server(Quiet)
    with connect(srv.address) as c:
        local = c.getsockname()
        wait_for(lambda: srv.service.session_count == 1, message="the session")
    wait_for(lambda: ended, message="OnDisconnected")
    s = ended.pop()
    seen = []
    barrier = threading.Barrier(8)

    def ask():
        barrier.wait()
        seen.append(s.address)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen[0] == ("127.0.0.1", local[1])
    assert all(a is seen[0] for a in seen)
    assert repr(s) == f"<Quiet 127.0.0.1:{local[1]} disconnected>"


def test_session_factory_must_make_sessions(backend):
    core = iocpnet.IocpCore(backend)
    with pytest.raises(TypeError):
        iocpnet.Service(core, iocpnet.Listener(0), 42, 10)
    core.Close()


@pytest.mark.skipif(struct.calcsize("P") != 8, reason="the layout of 64-bit builds")
def test_a_session_object_stays_within_its_idle_memory_budget():
    """Every idle connection holds one Session: its C fields past the object header are
    648 bytes on a 64-bit build.  A new field must find room (a flag byte in the tail
    went 8 bytes over once: 10,000 idle connections then cost 78 KiB more)."""
    assert iocpnet.Session.__basicsize__ - object.__basicsize__ <= 648


def test_listener_port_zero_picks_a_free_port(backend):
    core = iocpnet.IocpCore(backend)
    service = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), Echo, 4)
    service.Start()
    try:
        assert 1024 <= service.listener.port <= 65535
        with pytest.raises(OSError):     # the port is taken now
            other = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", service.listener.port)),
                                    Echo, 4)
            other.Start()
    finally:
        service.Stop()
        core.Close()


def test_a_bad_class_attribute_raises_and_leaks_nothing():
    """A limit that makes no sense fails the session's creation with ValueError, and
    the half-made session is not counted as gone twice (the no_leaks fixture)."""
    class NoQueue(iocpnet.Session):
        send_queue_limit = 0

    class Negative(iocpnet.Session):
        idle_timeout = -1

    for cls in (NoQueue, Negative):
        with pytest.raises(ValueError):
            cls()


@pytest.mark.parametrize("bad", ["some text", 5, [1, 2], None])
def test_one_wording_for_data_that_is_not_bytes(server, bad):
    """Send, Broadcast, SendPacket and make_packet refuse the same mistake with the
    same words (what was given, what is wanted, and for text how to fix it), and send
    nothing: Broadcast(5) must not send five zero bytes."""
    class Packets(iocpnet.PacketSession):
        pass

    srv = server(Packets)
    with connect(srv.address) as c:
        wait_for(lambda: srv.service.session_count == 1, message="the session")
        (s,) = srv.service.sessions
        kind = type(bad).__name__
        calls = {
            "Send": ("data", lambda: s.Send(bad)),
            "Broadcast": ("data", lambda: srv.service.Broadcast(bad)),
            "SendPacket": ("payload", lambda: s.SendPacket(1, bad)),
            "make_packet": ("payload", lambda: iocpnet.make_packet(1, bad)),
        }
        for name, (arg, call) in calls.items():
            with pytest.raises(TypeError) as e:
                call()
            msg = str(e.value)
            assert msg.startswith(f"{name}: {arg} must be a bytes-like object (bytes, "
                                  f"bytearray, memoryview), not {kind}"), msg
            assert ("encode the text first" in msg) == isinstance(bad, str), msg
        del s
        c.settimeout(0.3)
        with pytest.raises(socket.timeout):       # nothing sent, still connected
            c.recv(100)


def test_send_takes_its_data_positionally(server):
    """Send(data): one positional argument (a METH_O call, the cheapest CPython makes
    to a Cython method); a keyword is refused loudly and sends nothing."""
    srv = server(iocpnet.Session)
    with connect(srv.address) as c:
        wait_for(lambda: srv.service.session_count == 1, message="the session")
        (s,) = srv.service.sessions
        with pytest.raises(TypeError):
            s.Send(data=b"kw")
        assert s.Send(b"ok")
        del s
        assert recv_exactly(c, 2) == b"ok"


@pytest.mark.parametrize("websocket", [False, True])
def test_classes_made_at_run_time_are_not_kept(backend, websocket):
    """A server that makes Session classes as it runs (one per room, per plugin...)
    must not keep each one forever: the hooks resolved once per class live with the
    class (a method calling super() holds its class, so a cache beside it would)."""
    import gc
    import sys
    import weakref

    from ws_raw import RawClient, frame

    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()

    class Probe:
        pass
    if sys.getrefcount(Probe) > 1 << 30:
        pytest.skip("this interpreter makes every class immortal once a thread has run "
                    "(free-threaded 3.13): no class is ever freed")
    refs = []
    for k in range(3):
        base = iocpnet.WebSocketSession if websocket else iocpnet.Session

        class Made(base):
            measure_hooks = bool(k % 2)           # the wrapped hooks too

            def OnRecv(self, data):
                super().OnRecv(data)
                self.Send(bytes(data))

            def OnMessage(self, data, binary):
                super().OnMessage(data, binary)
                self.SendMessage(data)

        core = iocpnet.IocpCore(backend)
        svc = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0),
                                                     websocket=websocket), Made, 2)
        svc.Start()
        threads = [threading.Thread(target=lambda: [0 for _ in iter(
            lambda: core.Dispatch() >= 0, False)], daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            if websocket:
                c = RawClient(("127.0.0.1", svc.listener.port))
                c.send(frame(2, b"hi"))
                assert c.read_frame() == (True, 2, b"hi")
                c.close()
            else:
                with connect(("127.0.0.1", svc.listener.port)) as c:
                    c.sendall(b"hi")
                    assert recv_exactly(c, 2) == b"hi"
        finally:
            svc.Stop(5)
            core.Close(5)
            for t in threads:
                t.join(5)
        refs.append(weakref.ref(Made))
        del Made, svc, core, threads, c
    gc.collect()
    assert [r() for r in refs] == [None] * 3


def test_a_count_written_as_a_float_is_taken_or_named(server):
    """``send_queue_limit = 1e6`` (how Python writes a million) failed every session
    made with "'float' object cannot be interpreted as an integer", naming no attribute:
    the listener logged a failing factory per connection and served none.  A whole float
    is the int it is; 2.5 is a TypeError that names the class and the attribute."""
    class Big(iocpnet.Session):
        send_queue_limit = 1e6
        post_queue_limit = 1e3

        def OnRecv(self, data):
            self.Send(data)

    srv = server(Big)
    c = connect(srv.address)
    c.sendall(b"ping")
    assert recv_exactly(c, 4) == b"ping"
    c.close()

    class Half(iocpnet.Session):
        post_queue_limit = 2.5

    with pytest.raises(TypeError, match=r"Half\.post_queue_limit must be a whole number"):
        Half()


@pytest.mark.parametrize("name, value", [
    ("send_timeout", "30"), ("flush_timeout", True), ("send_queue_limit", None),
    ("idle_timeout", [30]), ("recv_buffer_limit", "64k")])
def test_a_setting_that_is_not_a_number_is_named_not_ignored(name, value):
    """``send_timeout = "30"`` (read from a config file) or ``flush_timeout = True`` was
    silently replaced by the default: the session ran with a limit its author never set."""
    cls = type("Typo", (iocpnet.Session,), {name: value})
    with pytest.raises(TypeError, match=rf"Typo\.{name} must be a number"):
        cls()


class _Count:
    """An integer type of another library (numpy's int64 is one): not an int subclass,
    an int through __index__."""
    def __init__(self, n):
        self.n = n

    def __index__(self):
        return self.n


def test_a_setting_of_another_numeric_type_is_taken_for_its_value():
    """``send_queue_limit = np.int64(...)`` (read through numpy or pandas),
    ``send_timeout = Fraction(1, 2)`` or ``Decimal("30")`` are numbers: they were refused
    with "must be a number" (and before that, silently the default)."""
    import decimal
    import fractions

    class Typed(iocpnet.Session):
        send_queue_limit = _Count(1 << 20)
        send_timeout = fractions.Fraction(1, 2)
        flush_timeout = decimal.Decimal("30")

    s = Typed()

    def in_force(name):
        return getattr(iocpnet.Session, name).__get__(s, Typed)
    assert (in_force("send_queue_limit"), in_force("send_timeout"),
            in_force("flush_timeout")) == (1 << 20, 0.5, 30)
    del s
    with pytest.raises(TypeError, match=r"Imaginary\.send_timeout must be a number"):
        type("Imaginary", (iocpnet.Session,), {"send_timeout": 1j})()


def test_none_is_off_where_zero_is_and_a_negative_flush_timeout_is_refused():
    """None where 0 means "none" (the idiom of ``websockets``: ``ping_interval=None``) was
    the default instead: ``send_timeout = None`` ended a slow reader after 10 s.  A negative
    ``flush_timeout`` dropped every close's queued data at once, without a word."""
    class Off(iocpnet.Session):
        send_timeout = None
        idle_timeout = None
        tls_handshake_timeout = None

    s = Off()
    # (the class attribute hides Session's property: ask the property what is in force)
    def in_force(name):
        return getattr(iocpnet.Session, name).__get__(s, Off)
    assert in_force("send_timeout") == 0 and in_force("flush_timeout") == 5
    del s

    class Hasty(iocpnet.Session):
        flush_timeout = -1

    with pytest.raises(ValueError, match="flush_timeout"):
        Hasty()
    with pytest.raises(TypeError, match=r"Forever\.flush_timeout must be a number"):
        type("Forever", (iocpnet.Session,), {"flush_timeout": None})()



async def _async_hook(self, *args):
    self.Send(b"never sent")


async def _async_gen_hook(self, *args):
    yield


def _gen_hook(self, *args):
    self.Send(b"never sent")
    yield


@pytest.mark.parametrize("hook", ["OnConnected", "OnRecv", "OnSend", "OnDisconnected",
                                  "OnRecvPacket", "OnMessage", "OnTaskDone"])
@pytest.mark.parametrize("body, kind", [(_async_hook, "an async def"),
                                        (_async_gen_hook, "an async generator"),
                                        (_gen_hook, "a generator")])
def test_a_hook_written_as_a_coroutine_or_generator_is_refused(hook, body, kind):
    """``async def OnConnected(self): self.Send(b"welcome")`` (an asyncio habit): the hook
    returned a coroutine nobody awaited, so its body never ran: no welcome, only a
    RuntimeWarning at garbage collection.  OnRecv as a coroutine disconnected the client
    with "'coroutine' object cannot be interpreted as an integer".  A generator's body
    never ran either.  The class is refused when its first session is made, naming the
    hook and the way out."""
    base = iocpnet.WebSocketSession if hook == "OnMessage" else iocpnet.Session
    cls = type("Eager", (base,), {hook: body})
    with pytest.raises(TypeError, match=rf"Eager\.{hook} is {kind}: .*Spawn"):
        cls()


def _eq_by_player(self, other):
    return getattr(other, "player_id", None) == self.player_id


@pytest.mark.parametrize("attrs, what", [
    ({"__eq__": _eq_by_player}, "__eq__"),                # __hash__ becomes None
    ({"__eq__": _eq_by_player, "__hash__": lambda self: hash(self.player_id)}, "__eq__"),
    ({"__hash__": None}, "__hash__"),
])
def test_a_session_class_with_its_own_equality_is_refused(attrs, what):
    """``__eq__`` comparing player ids (and a ``__hash__`` to match): a player who
    reconnected had two equal sessions, and the library's tables, keyed by session,
    took one for the other: in a room, the old session's end dropped the new one's name
    (Group.names went from ['alice', 'alice'] to ['']: the old one's name had been
    overwritten, then the entry popped), and presence in Redis the same way.  With
    ``__eq__`` alone (no hash) Group.Add raised after adding the member.  The class is
    refused when its first session is made, naming what it defines and the way out."""
    cls = type("Player", (iocpnet.PacketSession,), dict(attrs, player_id="alice"))
    with pytest.raises(TypeError, match=rf"Player defines {what}: sessions are compared "
                                        rf"by identity.*a\.player_id == b\.player_id"):
        cls()


@pytest.mark.skipif(not hasattr(inspect, "markcoroutinefunction"),
                    reason="inspect.markcoroutinefunction is Python 3.12+")
def test_a_hook_marked_as_a_coroutine_function_is_refused():
    """A plain def marked with inspect.markcoroutinefunction (what asyncio takes for an
    async def): the class check reads the flags of plain functions itself, without
    inspect, and must still see the mark (an attribute)."""
    cls = type("Marked", (iocpnet.Session,),
               {"OnRecv": inspect.markcoroutinefunction(lambda self, data: None)})
    with pytest.raises(TypeError, match=r"Marked\.OnRecv is an async def"):
        cls()


async def _async_job(ran):
    ran.append("ran")


def _gen_job(ran):
    ran.append("ran")
    yield


@pytest.mark.parametrize("call", ["Post", "CallLater", "CallEvery", "Spawn"])
@pytest.mark.parametrize("body, kind", [(_async_job, "a coroutine"),
                                        (_gen_job, "a generator")])
def test_a_session_job_written_as_a_coroutine_fails_as_a_job_that_raised(
        server, call, body, kind):
    """``self.Post(self.save_async)``: the hooks are refused as ``async def``
    (caf144f), but a job or timer callback that is one returned a coroutine nobody
    awaited, so its body never ran, in silence (a RuntimeWarning at collection at
    most); so did a Spawn callback.  It fails as a job that raised does: the session is
    disconnected with the reason, which names the job and Spawn."""
    ran = []
    ended = []
    done = threading.Event()

    class Poster(iocpnet.Session):
        def OnConnected(self):
            if call == "Post":
                self.Post(body, ran)
            elif call == "CallLater":
                self.CallLater(0.01, body, ran)
            elif call == "CallEvery":
                self.CallEvery(0.01, body, ran)
            else:
                self.Spawn(asyncio.sleep(0), body)       # body(task): the callback

        def OnDisconnected(self, reason):
            ended.append(reason)
            done.set()

    srv = server(Poster)
    c = connect(srv.address)
    try:
        assert done.wait(5), f"the session was not disconnected; bodies run: {ran}"
    finally:
        c.close()
    assert ran == []
    assert ended[0].startswith("exception in "), ended
    assert f"{body.__name__} returned {kind}" in ended[0] and "Spawn" in ended[0], ended


@pytest.mark.parametrize("call", ["Post", "CallLater"])
def test_a_core_job_written_as_a_coroutine_is_logged(backend, caplog_iocpnet, call):
    """The same on the core: IocpCore.Post(async_fn) is logged as a failed job, naming it
    and Spawn, instead of dropping its coroutine in silence."""
    ran = []
    core = iocpnet.IocpCore(backend)
    try:
        if call == "Post":
            core.Post(_async_job, ran)
        else:
            core.CallLater(0.0, _async_job, ran)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(
                "_async_job returned a coroutine" in r.getMessage() + str(r.exc_info)
                for r in caplog_iocpnet.records):
            core.Dispatch(50)
    finally:
        core.Close(5)
    assert ran == []
    msgs = [r.getMessage() + " " + str(r.exc_info and r.exc_info[1])
            for r in caplog_iocpnet.records if r.levelno >= logging.ERROR]
    assert any("_async_job returned a coroutine" in m and "Spawn" in m for m in msgs), msgs
