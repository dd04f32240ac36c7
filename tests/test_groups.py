"""Groups (rooms) and strands for game logic: Group membership and Broadcast order,
session and group jobs and timers on their strands, their cancellation when the owner
ends, and OnSendQueue.  Real sockets, every backend, counters balanced (conftest)."""
import logging
import queue
import selectors
import socket
import struct
import threading
import time

import pytest

import iocpnet
from conftest import connect, recv_exactly, wait_for
from flood import PostFlood
from test_tls import pki  # noqa: F401  (the fixture)

FRAME = struct.Struct("<II")          # (sender, seq): 8 bytes


def read_all(socks, nbytes, timeout=30):
    """Read exactly `nbytes` from every socket at once; returns {sock: bytes}."""
    sel = selectors.DefaultSelector()
    bufs = {}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        bufs[s] = bytearray()
    deadline = time.monotonic() + timeout
    left = len(socks)
    try:
        while left:
            if time.monotonic() > deadline:
                short = sum(1 for b in bufs.values() if len(b) < nbytes)
                raise AssertionError(f"{short} sockets still short of {nbytes} bytes")
            for key, _ in sel.select(0.2):
                s = key.fileobj
                chunk = s.recv(1 << 16)
                if not chunk:
                    raise AssertionError(f"closed after {len(bufs[s])} bytes")
                bufs[s] += chunk
                if len(bufs[s]) >= nbytes:
                    sel.unregister(s)
                    left -= 1
    finally:
        sel.close()
        for s in socks:
            s.setblocking(True)
    return {s: bytes(b) for s, b in bufs.items()}


class InHook:
    """A flag that proves two calls never overlap: a non-blocking acquire fails if
    another thread is inside (meaningful with or without a GIL: the body sleeps, which
    lets other threads run)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.overlaps = []
        self.calls = 0

    def __enter__(self):
        if not self.lock.acquire(blocking=False):
            self.overlaps.append(threading.current_thread().name)
            self.lock.acquire()
        self.calls += 1
        return self

    def __exit__(self, *exc):
        self.lock.release()


# ---- Group: order, membership ------------------------------------------------------------

def test_group_order_identical_for_50_members_under_2_workers(server):
    """Five members send numbered messages at once from five threads; the server
    broadcasts each one to the group from whichever worker got it.  All 50 members must
    hear the 1,000 messages in one and the same order."""
    room = {}

    class Member(iocpnet.Session):
        def OnConnected(self):
            room["g"].Add(self)
            self.Send(b"J")

        def OnRecv(self, data):
            n = len(data) - len(data) % FRAME.size
            for off in range(0, n, FRAME.size):
                room["g"].Broadcast(bytes(data[off:off + FRAME.size]))
            return n

    srv = server(Member, workers=2, accepts=64)
    room["g"] = iocpnet.Group(srv.core, "arena")
    socks = [connect(srv.address) for _ in range(50)]
    for s in socks:
        assert recv_exactly(s, 1) == b"J"
    assert len(room["g"]) == 50
    senders, per_sender = 5, 200

    def send(i):
        s = socks[i]
        for seq in range(per_sender):
            s.sendall(FRAME.pack(i, seq))
            if seq % 20 == 0:
                time.sleep(0.001)       # bursts: the senders' messages interleave

    threads = [threading.Thread(target=send, args=(i,)) for i in range(senders)]
    for t in threads:
        t.start()
    got = read_all(socks, senders * per_sender * FRAME.size)
    for t in threads:
        t.join()
    orders = {s: [FRAME.unpack_from(b, o) for o in range(0, len(b), FRAME.size)]
              for s, b in got.items()}
    first = orders[socks[0]]
    assert len(first) == senders * per_sender
    # Each sender's own messages in its order (one connection, one strand)...
    for i in range(senders):
        assert [seq for who, seq in first if who == i] == list(range(per_sender))
    # ...and one total order for the whole group, the same for every member.
    for s in socks[1:]:
        assert orders[s] == first
    for s in socks:
        s.close()
    wait_for(lambda: len(room["g"]) == 0, message="members removed at their end")
    room.clear()


def test_group_membership_snapshot_many_groups_and_auto_removal(server, recorder):
    lobby_ref = {}
    sessions = []

    class Player(iocpnet.Session):
        def OnConnected(self):
            sessions.append(self)
            recorder.add("up")

        def OnDisconnected(self, reason):
            # Already out of its groups when OnDisconnected runs.
            recorder.add("down", len(self.groups), self in lobby_ref["lobby"])
            recorder.on_disconnected(self, reason)

    srv = server(Player)
    lobby = iocpnet.Group(srv.service, "lobby")      # a Service works as well as a core
    lobby_ref["lobby"] = lobby
    match = iocpnet.Group(srv.core, "match-1")
    socks = [connect(srv.address) for _ in range(3)]
    wait_for(lambda: len(sessions) == 3)
    # Accepts complete on two workers: find each session's client by its port.
    by_port = {s.getsockname()[1]: s for s in socks}
    a, b, c = sessions
    socks = [by_port[x.address[1]] for x in (a, b, c)]
    assert lobby.Add(a) and lobby.Add(b) and lobby.Add(c)
    assert not lobby.Add(a), "a second Add of a member is a no-op"
    assert match.Add(a) and match.Add(b)
    assert len(lobby) == 3 and len(match) == 2
    assert a in lobby and c not in match
    assert set(a.groups) == {lobby, match} and c.groups == [lobby]
    snapshot = iter(lobby)
    assert lobby.Remove(b)
    assert not lobby.Remove(b)
    assert list(snapshot) == [a, b, c], "iteration is over a snapshot"
    assert lobby.members == [a, c]
    assert b.groups == [match]
    # Broadcast with exclude: a and not c... (c is in lobby, a is excluded)
    assert lobby.Broadcast(b"hi", exclude=a) == 1
    assert recv_exactly(socks[2], 2) == b"hi"
    with pytest.raises(TypeError, match="Group.Broadcast: data must be a bytes-like"):
        match.Broadcast("text")
    with pytest.raises(TypeError):
        match.Broadcast(5)
    assert match.Broadcast(bytearray(b"m!")) == 2
    assert recv_exactly(socks[0], 2) == b"m!"
    assert recv_exactly(socks[1], 2) == b"m!"
    # A member that disconnects leaves every group it was in, before OnDisconnected.
    socks[0].close()
    recorder.wait_disconnects(1)
    assert ("down", 0, False) in recorder.events
    assert a not in lobby and a not in match
    assert len(lobby) == 1 and len(match) == 1
    # An ended session joins nothing.
    assert not lobby.Add(a)
    # Close removes the members and takes no more (False, as for an ended session).
    match.Close()
    assert len(match) == 0 and match.closed and b.groups == []
    assert match.Add(c) is False and c not in match
    assert match.Broadcast(b"x") == 0
    for s in socks[1:]:
        s.close()
    recorder.wait_disconnects(3)
    assert len(lobby) == 0
    sessions.clear()
    lobby_ref.clear()


def test_group_refuses_a_session_of_another_core(backend):
    core1, core2 = iocpnet.IocpCore(backend), iocpnet.IocpCore(backend)
    try:
        g = iocpnet.Group(core1)
        s = iocpnet.Session()
        with pytest.raises(ValueError):
            g.Add(s)         # no core yet: not this group's core
        with pytest.raises(TypeError):
            iocpnet.Group(object())
        assert not g.Add.__doc__ is None
    finally:
        core1.Close()
        core2.Close()


def test_broadcast_calls_a_subclass_send(server):
    """A member whose class overrides Send gets the group's messages through it."""
    seen = []

    class Framed(iocpnet.Session):
        def Send(self, data):
            seen.append(bytes(data))
            return super().Send(b"<" + bytes(data) + b">")

    srv = server(Framed)
    g = iocpnet.Group(srv.core)
    s = connect(srv.address)
    wait_for(lambda: srv.service.session_count == 1)
    g.Add(srv.service.sessions[0])
    assert g.Broadcast(b"abc") == 1
    assert recv_exactly(s, 5) == b"<abc>"
    assert seen == [b"abc"]
    s.close()
    wait_for(lambda: len(g) == 0)


@pytest.mark.parametrize("exc", [SystemExit, KeyboardInterrupt])
def test_a_member_send_that_raises_systemexit_costs_the_others_nothing(server, exc):
    """A member class whose Send raises what is not an Exception (sys.exit() in an
    override, a Ctrl-C landing there) stopped the fan-out at that member: the members
    after it never heard the message, so the room's members no longer heard one stream.
    Every member hears it; the exception is raised again in the caller after the
    fan-out (it is not swallowed)."""
    class Member(iocpnet.Session):
        quit = False                        # set on the second member: it raises once

        def Send(self, data):
            if self.quit:
                self.quit = False
                raise exc()
            return super().Send(data)

    srv = server(Member)
    g = iocpnet.Group(srv.core, "room")
    socks = []
    try:
        for k in range(3):                  # Add order: the fan-out's order
            socks.append(connect(srv.address))
            wait_for(lambda: srv.service.session_count == k + 1)
            (new,) = [s for s in srv.service.sessions if s not in g]
            new.quit = k == 1
            assert g.Add(new)
        with pytest.raises(exc):
            g.Broadcast(b"hello")
        assert recv_exactly(socks[0], 5) == b"hello"
        assert recv_exactly(socks[2], 5) == b"hello"   # after the one that raised
        assert g.Broadcast(b"again") == 3      # the group goes on
        for c in socks:
            assert recv_exactly(c, 5) == b"again"
    finally:
        for c in socks:
            c.close()
        g.Close()


def test_two_groups_whose_members_send_into_each_other_do_not_deadlock(server):
    """A member class whose own Send broadcasts into another group (a relay between two
    rooms), both groups broadcasting at once from two threads: each fan-out is inside a
    member's Send of one group when it broadcasts into the other.  A group that held an
    order lock across its members' Sends deadlocked here (each thread waiting for the
    lock the other holds).  Both must end, and every member still hears its group's
    messages in one order: the relayed one after the one being fanned out."""
    inside = threading.Barrier(2, timeout=10)
    groups = {}

    class Relay(iocpnet.Session):
        other = None

        def Send(self, data):
            if bytes(data) == b"go|":
                inside.wait()          # both fan-outs are now inside a member's Send
                groups[self.other].Broadcast(b"to-" + self.other.encode() + b"|")
            return super().Send(data)

    srv = server(Relay)
    groups["a"] = iocpnet.Group(srv.core, "a")
    groups["b"] = iocpnet.Group(srv.core, "b")
    socks = {name: connect(srv.address) for name in "ab"}
    wait_for(lambda: srv.service.session_count == 2)
    by_port = {s.address[1]: s for s in srv.service.sessions}
    for name, sock in socks.items():
        session = by_port[sock.getsockname()[1]]
        session.other = "b" if name == "a" else "a"
        assert groups[name].Add(session)
    took = {}

    def broadcast(name):
        took[name] = groups[name].Broadcast(b"go|")

    threads = [threading.Thread(target=broadcast, args=(n,), daemon=True) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, "two groups broadcasting into each other deadlocked"
    assert took == {"a": 1, "b": 1}
    # Each member: its own group's message, then the one relayed into its group from the
    # other's fan-out (queued while this group's fan-out was under way).
    assert recv_exactly(socks["a"], 8) == b"go|to-a|"
    assert recv_exactly(socks["b"], 8) == b"go|to-b|"
    for sock in socks.values():
        sock.close()
    wait_for(lambda: len(groups["a"]) + len(groups["b"]) == 0)
    groups.clear()


def test_each_broadcast_is_fanned_out_by_its_own_caller_in_turn(server):
    """Two threads broadcast to one group, the second while the first's fan-out is under
    way: the first returns once its own message is out, and the second's is fanned out
    by the second thread when its turn comes (as an order lock did), not by the first.
    A fan-out that also sent every message queued behind it kept one worker sending for
    as long as others broadcast without pause, its own batch waiting meanwhile."""
    in_first = threading.Event()
    release_first = threading.Event()
    senders = {}

    class Slow(iocpnet.Session):
        def Send(self, data):
            senders.setdefault(bytes(data), threading.current_thread().name)
            if bytes(data) == b"first|":
                in_first.set()
                release_first.wait(10)
            return super().Send(data)

    srv = server(Slow)
    group = iocpnet.Group(srv.core, "room")
    sock = connect(srv.address)
    wait_for(lambda: srv.service.session_count == 1)
    assert group.Add(srv.service.sessions[0])
    took = {}

    def broadcast(data):
        took[data] = group.Broadcast(data)

    first = threading.Thread(target=broadcast, args=(b"first|",), name="first")
    second = threading.Thread(target=broadcast, args=(b"second|",), name="second")
    first.start()
    assert in_first.wait(10)
    second.start()
    # The second is queued behind the first's fan-out (it cannot be fanned out before).
    wait_for(lambda: not second.is_alive() or group._queued_count() == 1,
             message="the second broadcast queued")
    release_first.set()
    first.join(10)
    second.join(10)
    assert not first.is_alive() and not second.is_alive()
    assert senders == {b"first|": "first", b"second|": "second"}, senders
    assert took == {b"first|": 1, b"second|": 1}
    assert recv_exactly(sock, 13) == b"first|second|"
    sock.close()
    wait_for(lambda: len(group) == 0)


def test_broadcasts_from_threads_and_from_inside_fan_outs_keep_one_order(server):
    """Four threads broadcast 150 messages each to a group of five members whose Send,
    for each tenth message, broadcasts a reply into the same group from inside the
    fan-out (queued behind it, sent by whichever fan-out comes to it).  Every member
    hears the same 660 messages in one order, each thread's own in its order, each reply
    after the message it answers; every caller's Broadcast says 5 took it."""
    threads_n, per_thread = 4, 150
    groups = {}

    class Echoing(iocpnet.Session):
        def Send(self, data):
            raw = bytes(data)
            if raw[0] == ord("m") and self is groups["first"] and raw[-2] == ord("0"):
                groups["g"].Broadcast(b"r" + raw[1:])
            return super().Send(data)

    srv = server(Echoing)
    group = groups["g"] = iocpnet.Group(srv.core, "room")
    socks = [connect(srv.address) for _ in range(5)]
    wait_for(lambda: srv.service.session_count == 5)
    sessions = srv.service.sessions
    groups["first"] = sessions[0]
    for s in sessions:
        assert group.Add(s)
    counts = []
    start = threading.Barrier(threads_n)

    def run(t):
        start.wait(10)
        for k in range(per_thread):
            counts.append(group.Broadcast(b"m%d.%03d\n" % (t, k)))

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads_n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert not any(w.is_alive() for w in workers), "a broadcast never returned"
    assert counts == [5] * (threads_n * per_thread)
    total = threads_n * per_thread + threads_n * per_thread // 10
    got = read_all(socks, total * 7)
    orders = [got[s].split(b"\n")[:-1] for s in socks]
    assert all(order == orders[0] for order in orders[1:])
    first = orders[0]
    assert len(first) == total
    for t in range(threads_n):
        mine = [m for m in first if m.startswith(b"m%d." % t)]
        assert mine == [b"m%d.%03d" % (t, k) for k in range(per_thread)]
    for i, m in enumerate(first):
        if m.startswith(b"r"):
            assert first.index(b"m" + m[1:]) < i, m
    for sock in socks:
        sock.close()
    wait_for(lambda: len(group) == 0)
    groups.clear()


# ---- strands: what runs where ------------------------------------------------------------

def test_session_timers_and_jobs_never_run_beside_its_hooks(server):
    """A session's CallEvery tick, its jobs posted from other threads and its hooks all
    run on its strand: never two at once, with 2 workers, hooks that sleep (other
    threads get to run, with or without a GIL) and a second session keeping the other
    worker busy."""
    flags = {}
    ticks = []

    class Busy(iocpnet.Session):
        def OnConnected(self):
            flags[self] = InHook()
            with flags[self]:
                self.timer = self.CallEvery(0.001, self.tick)
                self.Send(b"R")

        def tick(self):
            with flags[self]:
                ticks.append(1)
                time.sleep(0.0005)

        def job(self, sem):
            with flags[self]:
                time.sleep(0.0002)
            sem.release()

        def OnRecv(self, data):
            with flags[self]:
                time.sleep(0.001)
                self.Send(bytes(data))

        def OnSend(self, n):
            with flags[self]:
                pass

        def OnDisconnected(self, reason):
            with flags[self]:
                pass

    srv = server(Busy, workers=2)
    socks = [connect(srv.address) for _ in range(2)]
    for s in socks:
        assert recv_exactly(s, 1) == b"R"
    sessions = srv.service.sessions
    stop = threading.Event()

    def poster(sess):
        # At most 8 of its jobs queued at a time: the strand is never flooded, however
        # slow a loaded machine makes it.
        sem = threading.BoundedSemaphore(8)
        while not stop.is_set():
            if sem.acquire(timeout=0.1):
                assert sess.Post(sess.job, sem)

    posters = [threading.Thread(target=poster, args=(s,)) for s in sessions for _ in (0, 1)]
    for t in posters:
        t.start()
    deadline = time.monotonic() + 1.5
    n = 0
    while time.monotonic() < deadline:
        for s in socks:
            s.sendall(b"x" * 16)
            assert recv_exactly(s, 16) == b"x" * 16
        n += 1
    stop.set()
    for t in posters:
        t.join()
    assert len(ticks) > 10, "the tick ran"
    for f in flags.values():
        assert not f.overlaps, f"a timer, job or hook ran beside another: {f.overlaps}"
        assert f.calls > n
    for s in socks:
        s.close()
    wait_for(lambda: srv.service.session_count == 0)
    del sessions
    flags.clear()


def test_session_post_runs_in_order_on_a_worker(server):
    order = []
    done = threading.Event()

    class S(iocpnet.Session):
        def OnConnected(self):
            me = threading.current_thread().name
            for i in range(100):
                self.Post(self.step, i, me)

        def step(self, i, poster_thread):
            order.append((i, threading.current_thread().name.startswith("test-worker")))
            if i == 99:
                done.set()

    srv = server(S, workers=2)
    s = connect(srv.address)
    assert done.wait(10)
    assert [i for i, _ in order] == list(range(100))
    assert all(on_worker for _, on_worker in order)
    s.close()
    wait_for(lambda: srv.service.session_count == 0)


def test_session_timers_and_jobs_cancelled_when_it_ends(server, recorder):
    """At the session's end its timers are cancelled and its queued jobs dropped:
    nothing of it runs after OnDisconnected, and the counters balance (conftest)."""
    ran_after = []
    holder = {}

    class S(iocpnet.Session):
        ended = False

        def OnConnected(self):
            holder["s"] = self
            self.tick_timer = self.CallEvery(0.005, self.tick)
            self.late = self.CallLater(60, self.tick)
            self.Send(b"R")

        def tick(self):
            if self.ended:
                ran_after.append("tick")

        def OnRecv(self, data):
            # Jobs queued behind the disconnect: they must be dropped, not run.
            for _ in range(50):
                self.Post(self.job)
            self.Disconnect("bye")

        def job(self):
            if self.ended:
                ran_after.append("job")

        def OnDisconnected(self, reason):
            self.ended = True
            recorder.on_disconnected(self, reason)

    srv = server(S, workers=2)
    c = connect(srv.address)
    assert recv_exactly(c, 1) == b"R"
    time.sleep(0.05)                # the tick runs a few times: still two timers
    counters = iocpnet.debug_counters()
    assert counters["strand_timers"] == 2
    c.sendall(b"go")
    recorder.wait_disconnects(1)
    s = holder.pop("s")
    wait_for(lambda: not s.tick_timer.active and not s.late.active,
             message="both timers ended")
    time.sleep(0.05)                # a late tick or job's chance to run: none must
    assert ran_after == []
    assert s.tick_timer.cancelled and s.late.cancelled
    # After its end a session takes no more work.
    assert s.Post(print) is False
    t = s.CallLater(0.01, print)
    assert not t.active and t.cancelled
    wait_for(lambda: iocpnet.debug_counters()["strand_jobs"] == 0)
    assert iocpnet.debug_counters()["strand_timers"] == 0
    c.close()
    del s, t


def test_post_is_bounded_and_stop_ends_while_threads_post(server, recorder):
    """Threads posting to a session faster than its strand runs the jobs grew its
    queue without limit (millions of jobs in 0.5 s), its own receive waited behind
    them, and Stop could not end it while they posted.  Past ``post_queue_limit`` Post
    raises queue.Full; the session goes on (its receive is served); Stop ends it while
    the threads still post, and Post then returns False."""
    holder = []

    class S(iocpnet.Session):
        post_queue_limit = 50

        def OnConnected(self):
            holder.append(self)
            self.Send(b"R")

        def job(self):
            time.sleep(0.001)             # slower than the posters

        def OnRecv(self, data):
            self.Send(data)

        def OnDisconnected(self, reason):
            recorder.on_disconnected(self, reason)

    srv = server(S, workers=2)
    c = connect(srv.address)
    assert recv_exactly(c, 1) == b"R"
    s = holder.pop()
    with PostFlood(lambda: s.Post(s.job)) as flood:
        wait_for(lambda: flood.refused, message="a Post refused past post_queue_limit")
        assert "post_queue_limit" in flood.refused[0]
        assert iocpnet.debug_counters()["strand_jobs"] <= 50 + 10
        c.sendall(b"ping")
        assert recv_exactly(c, 4) == b"ping"
        srv.service.Stop(5)
        recorder.wait_disconnects(1)
        assert srv.service.session_count == 0
        # the session ended: Post says so (False), and each poster stops
        wait_for(lambda: len(flood.ended) == 2,
                 message="both posters told the session ended")
    c.close()
    s = None


def test_a_group_class_sets_its_post_queue_limit(backend):
    """A Group's bound on jobs waiting on its strand was fixed at 10000, shared by all
    who post there (a room's players): a class attribute now, as a Session's is, checked
    when the group is made."""
    core = iocpnet.IocpCore(backend)
    try:
        class Small(iocpnet.Group):
            post_queue_limit = 3

        g = Small(core, "small")
        gate = threading.Event()
        assert g.Post(gate.wait, 10)              # no worker yet: every job waits
        assert g.Post(len, "") and g.Post(len, "")
        with pytest.raises(queue.Full, match="3 jobs waiting"):
            g.Post(len, "")
        for bad, error in ((0, ValueError), (-1, ValueError), ("many", TypeError),
                           (1.5, TypeError)):
            cls = type("Bad", (iocpnet.Group,), {"post_queue_limit": bad})
            with pytest.raises(error, match="post_queue_limit"):
                cls(core, "bad")
        gate.set()
        g.Close()
    finally:
        core.Close(5)


def test_session_job_that_raises_disconnects_it(server, recorder, caplog):
    class S(iocpnet.Session):
        def OnConnected(self):
            self.Post(self.boom)

        def boom(self):
            raise ZeroDivisionError("tick went wrong")

        def OnDisconnected(self, reason):
            recorder.on_disconnected(self, reason)

    srv = server(S)
    c = connect(srv.address)
    recorder.wait_disconnects(1)
    reason = recorder.disconnected[0][1]
    assert reason.startswith("exception in job ") and "ZeroDivisionError" in reason
    assert "tick went wrong" in caplog.text
    c.close()


def test_group_strand_serialises_posts_and_ticks_and_close_cancels(backend, server):
    class Idle(iocpnet.Session):
        pass

    srv = server(Idle, workers=2)
    room = iocpnet.Group(srv.core, "room")
    flag = InHook()
    order = []
    ticks = []

    def job(src, i):
        with flag:
            order.append((src, i))
            time.sleep(0.0002)

    def tick():
        with flag:
            ticks.append(time.monotonic())
            time.sleep(0.0005)

    timer = room.CallEvery(0.002, tick)

    def poster(src):
        for i in range(200):
            assert room.Post(job, src, i)

    threads = [threading.Thread(target=poster, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_for(lambda: len(order) == 600, message="all group jobs ran")
    assert not flag.overlaps, f"group jobs overlapped: {flag.overlaps}"
    for k in range(3):
        assert [i for src, i in order if src == k] == list(range(200)), "FIFO per poster"
    wait_for(lambda: len(ticks) > 5)
    # A raising group job is logged; the group goes on.
    room.Post(lambda: 1 / 0)
    done = threading.Event()
    room.Post(done.set)
    assert done.wait(5)
    room.Close()
    wait_for(lambda: not timer.active, message="Close cancelled the tick")
    n = len(ticks)
    time.sleep(0.05)                # a tick after Close would show now: none must
    assert len(ticks) == n
    assert room.Post(job, 9, 9) is False
    assert not room.CallLater(0.01, tick).active
    assert iocpnet.debug_counters()["strand_timers"] == 0


# ---- OnSendQueue --------------------------------------------------------------------------

def test_on_send_queue_high_then_low(server, recorder):
    """A peer that stops reading: OnSendQueue(True) once the queue passes
    send_queue_high; once the peer reads again and the queue drains to send_queue_low,
    OnSendQueue(False).  Both on the strand, never twice alike in a row."""
    calls = []
    holder = {}

    class Streamer(iocpnet.Session):
        send_queue_high = 256 * 1024
        send_queue_low = 64 * 1024
        send_queue_limit = 64 * 1024 * 1024

        def OnConnected(self):
            holder["s"] = self
            self.flag = InHook()
            self.Send(b"R")

        def OnRecv(self, data):
            with self.flag:
                chunk = b"z" * 65536
                for _ in range(160):                # 10 MiB: more than the socket holds
                    self.Send(chunk)

        def OnSendQueue(self, high):
            with self.flag:
                calls.append((high, self.send_queue_bytes))

    srv = server(Streamer, workers=2)
    c = connect(srv.address)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    assert recv_exactly(c, 1) == b"R"
    c.sendall(b"go")
    wait_for(lambda: calls, message="OnSendQueue(True)")
    assert calls[0][0] is True
    s = holder["s"]
    assert s.send_queue_bytes >= Streamer.send_queue_high
    assert s.send_queue_high == 256 * 1024 and s.send_queue_low == 64 * 1024
    # A droppable broadcast (a state update) skips it meanwhile; a plain one does not.
    g = iocpnet.Group(srv.core)
    assert g.Add(s)
    assert g.Broadcast(b"state", droppable=True) == 0
    assert g.Broadcast(b"!") == 1
    assert recv_exactly(c, 160 * 65536) == b"z" * (160 * 65536)
    assert recv_exactly(c, 1) == b"!"
    wait_for(lambda: len(calls) >= 2, message="OnSendQueue(False)")
    assert calls[1][0] is False and calls[1][1] <= Streamer.send_queue_low
    assert [h for h, _ in calls] == [True, False]
    assert not s.flag.overlaps
    c.close()
    wait_for(lambda: srv.service.session_count == 0)
    holder.clear()


@pytest.mark.parametrize("attrs", [
    {"send_queue_high": 100, "send_queue_low": 100},
    {"send_queue_high": 10 ** 9},
    {"send_queue_low": -1},
])
def test_send_queue_marks_are_checked(attrs):
    cls = type("Bad", (iocpnet.Session,), attrs)
    with pytest.raises(ValueError, match="send_queue_low"):
        cls()


def test_broadcast_to_tls_members_goes_through_each_ones_filter(server, pki):
    """Members on TLS get the group's messages encrypted for each of them (the one
    bytes object is each member's plaintext), in the group's order."""
    from test_tls import client_context, server_context, tls_connect

    room = {}

    class Member(iocpnet.Session):
        def OnConnected(self):
            room["g"].Add(self)
            self.Send(b"J")

        def OnRecv(self, data):
            room["g"].Broadcast(bytes(data))

    srv = server(Member, ssl=server_context(pki))
    room["g"] = iocpnet.Group(srv.core)
    socks = [tls_connect(srv.address, client_context(pki)) for _ in range(3)]
    for s in socks:
        assert recv_exactly(s, 1) == b"J"
    for i in range(20):
        socks[i % 3].sendall(b"m%02d" % i)
        for s in socks:
            assert recv_exactly(s, 3) == b"m%02d" % i
    for s in socks:
        s.close()
    wait_for(lambda: len(room["g"]) == 0)
    room.clear()


def test_broadcast_reaches_websocket_and_tcp_members_alike(server):
    """A WebSocket member hears the group's messages as binary messages, in the same
    order as a plain TCP member beside it."""
    pytest.importorskip("websockets")
    from websockets.sync.client import connect as ws_connect

    room = {}

    class Tcp(iocpnet.Session):
        def OnConnected(self):
            room["g"].Add(self)

    class Ws(iocpnet.WebSocketSession):
        def OnConnected(self):
            room["g"].Add(self)

        def OnMessage(self, data, binary):
            room["g"].Broadcast(bytes(data) if binary else data.encode())

    tcp = server(Tcp)
    core = tcp.core
    room["g"] = iocpnet.Group(core)
    ws_service = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0), websocket=True),
                                 Ws, 4)
    ws_service.Start()
    try:
        t = connect(tcp.address)
        with ws_connect(f"ws://127.0.0.1:{ws_service.listener.port}") as w:
            wait_for(lambda: len(room["g"]) == 2)
            for i in range(10):
                w.send(b"%02d" % i)
            got_ws = [w.recv(timeout=10) for _ in range(10)]
        got_tcp = recv_exactly(t, 20)
        assert got_ws == [b"%02d" % i for i in range(10)]
        assert got_tcp == b"".join(got_ws)
        t.close()
    finally:
        ws_service.Stop()
    wait_for(lambda: len(room["g"]) == 0)
    room.clear()
