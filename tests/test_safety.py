"""Core safety: receive views and descriptors (issue 13), one test per way it broke.

Each test is what a user, or a hostile peer, does in a few lines; each crossed bytes
between connections or froze other sessions before the fix:

- ``Send`` then ``Abort`` closed the socket while the send still waited to be submitted
  (io_uring): a socket opened next, with the same number, got the old session's bytes.
- Running out of receive buffers re-armed every waiting receive, newest first, and a
  waiter woken by a hook's release waited for the end of that hook's batch.
"""
import socket
import threading
import time

import iocpnet

from conftest import connect, recv_exactly, wait_for


def _drain_quietly(sock, timeout):
    """What arrives on sock within timeout seconds (until EOF, reset or silence)."""
    sock.settimeout(timeout)
    got = bytearray()
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    except (socket.timeout, ConnectionError):
        pass
    return bytes(got)


# ---- 2. descriptors: nothing reaches a socket after it was closed ---------------------------

class _Other:
    """A plain listener standing for "any socket the process opens next"."""

    def __init__(self):
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.address = self.lsock.getsockname()
        self.clients = []
        self.lock = threading.Lock()

    def close(self):
        with self.lock:
            for c in self.clients:
                c.close()
        self.lsock.close()


def test_send_abort_then_open_sockets_in_hook(server):
    """A hook sends, aborts, then opens connections (the number just closed is the first
    one free): not a byte of the aborted session's send may reach them, on any backend."""
    other = _Other()
    opened = threading.Event()

    class Kicker(iocpnet.Session):
        def OnRecv(self, data):
            self.Send(b"SECRET-OF-THE-KICKED-PLAYER")
            self.Abort("kicked")
            for _ in range(4):
                s = socket.create_connection(other.address)
                with other.lock:
                    other.clients.append(s)
            opened.set()

    srv = server(Kicker)
    try:
        peers = []
        for _ in range(3):
            with connect(srv.address) as c:
                opened.clear()
                c.sendall(b"kick me")
                assert opened.wait(10)
                _drain_quietly(c, 0.5)
            for _ in range(4):
                a, _ = other.lsock.accept()
                peers.append(a)
        for a in peers:
            got = _drain_quietly(a, 0.3)
            assert got == b"", f"another connection received the kicked player's bytes: {got!r}"
            a.close()
    finally:
        other.close()


def test_kick_during_connect_storm(server):
    """An admin kick (goodbye, then Abort) while clients connect as fast as they can:
    each client's first bytes are its own greeting, never someone else's goodbye."""
    counter = iter(range(10**9))
    lock = threading.Lock()

    class Player(iocpnet.Session):
        def OnConnected(self):
            with lock:
                self.n = next(counter)
            self.Send(b"ID%08d" % self.n)

        def OnRecv(self, data):
            self.Send(b"GOODBYE-%08d" % self.n)
            self.Abort("kicked")

    srv = server(Player, workers=2, accepts=64)
    stop = time.monotonic() + 3.0
    crossed, served = [], [0]

    def storm():
        while time.monotonic() < stop:
            try:
                c = socket.create_connection(srv.address, timeout=5)
            except OSError:
                continue
            with c:
                try:
                    first = recv_exactly(c, 10)
                except (OSError, ConnectionError):
                    continue
                if not first.startswith(b"ID"):
                    crossed.append(first)
                    continue
                try:
                    c.sendall(b"k")
                    rest = _drain_quietly(c, 2.0)
                except OSError:
                    continue
                if rest and rest != b"GOODBYE-" + first[2:]:
                    crossed.append(first + rest)
                with lock:
                    served[0] += 1

    threads = [threading.Thread(target=storm) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert served[0] > 50, f"only {served[0]} clients were served"
    assert crossed == [], f"{len(crossed)} of {served[0]} clients got another's bytes: {crossed[:3]}"


# ---- 5. buffer exhaustion: waiters served one per buffer, oldest first --------------------

def test_buffer_exhaustion_serves_waiters_in_order(server):
    """Two hooks hold the only two receive buffers; eight more sessions receive data
    meanwhile and wait.  As buffers come back, each waiter is served, in the order its
    data came."""
    gate = [threading.Event(), threading.Event()]
    holding = [threading.Event(), threading.Event()]
    order = []
    lock = threading.Lock()

    class Waiter(iocpnet.Session):
        def OnRecv(self, data):
            tag = bytes(data)
            if tag.startswith(b"hold"):
                holding[int(tag[4:])].set()
                gate[int(tag[4:])].wait(20)
            else:
                with lock:
                    order.append(int(tag))
            self.Send(b"done")

    srv = server(Waiter, workers=3, core_kw={"recv_buffer_count": 2})
    holders = [connect(srv.address) for _ in range(2)]
    waiters = [connect(srv.address) for _ in range(8)]
    try:
        for i, h in enumerate(holders):
            # One at a time, so that each lands on a worker of its own (two in one
            # batch would run one after the other).
            h.sendall(b"hold%d" % i)
            assert holding[i].wait(10)
        for i, w in enumerate(waiters):
            w.sendall(b"%d" % i)
            # One after the other: each is seen waiting before the next one sends.
            wait_for(lambda: srv.core.stats()["recv_waiting"] == i + 1, 10,
                     f"waiter {i} to wait for a buffer")
        assert order == []                # nobody served without a buffer
        gate[0].set()                     # one buffer circulates from now on
        for w in waiters:
            w.settimeout(10)
            assert recv_exactly(w, 4) == b"done"
        assert order == list(range(8))
        gate[1].set()
        for h in holders:
            h.settimeout(10)
            assert recv_exactly(h, 4) == b"done"
    finally:
        for g in gate:
            g.set()
        for s in holders + waiters:
            s.close()
