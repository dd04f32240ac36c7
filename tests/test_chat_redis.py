"""The chat example over two server processes sharing rooms through a real redis-server
(``examples/chat_server.py --redis URL``), as a user runs it: two servers on two ports,
three raw protocol clients on each, one room.  One order for all six; WHO lists both
servers' members; Redis killed and started again mid-run; a server killed with SIGKILL
leaves WHO within the presence TTL; a password in the URL."""
import signal
import socket
import time

import pytest

from iocpnet import chat_protocol as proto

from conftest import connect, recv_exactly
from subproc import EXAMPLES, Proc

ROOM = "lobby"
TTL = 3.0          # RedisBackplane's default presence_ttl, which the example uses


class Chatter:
    """One client connection, reading packets; what it is not waiting for is kept."""

    def __init__(self, port):
        self.sock = connect(("127.0.0.1", port), timeout=20)
        self.kept = []
        pid, payload = self._read_one()
        assert pid == proto.S_WELCOME
        self.nick = proto.Reader(payload).str8()

    def _read_one(self):
        header = recv_exactly(self.sock, 4)
        size = header[0] | header[1] << 8
        return header[2] | header[3] << 8, recv_exactly(self.sock, size - 4)

    def until(self, want, timeout=20):
        """The next packet with id `want`; the others before it are kept, in order."""
        for i, (pid, payload) in enumerate(self.kept):
            if pid == want:
                del self.kept[i]
                return payload
        self.sock.settimeout(timeout)
        while True:
            pid, payload = self._read_one()
            if pid == want:
                return payload
            self.kept.append((pid, payload))

    def join(self):
        self.sock.sendall(proto.join(ROOM))
        r = proto.Reader(self.until(proto.S_WHO))
        assert r.str8() == ROOM
        return [r.str8() for _ in range(r.u16())]

    def who(self):
        self.sock.sendall(proto.who(ROOM))
        r = proto.Reader(self.until(proto.S_WHO))
        r.str8()
        return sorted(r.str8() for _ in range(r.u16()))

    def say(self, text):
        self.sock.sendall(proto.say(ROOM, text))

    def said(self, n, timeout=20):
        """The next `n` S_SAID texts, as "nick text"."""
        out = [self._said(p) for pid, p in self.kept if pid == proto.S_SAID]
        self.kept = [(pid, p) for pid, p in self.kept if pid != proto.S_SAID]
        while len(out) < n:
            out.append(self._said(self.until(proto.S_SAID, timeout)))
        return out

    @staticmethod
    def _said(payload):
        r = proto.Reader(payload)
        r.str8()
        nick = r.str8()
        return f"{nick} {r.text()}"

    def silent(self, seconds):
        """No S_SAID arrives for `seconds` (other packets are kept)."""
        if any(pid == proto.S_SAID for pid, _ in self.kept):
            return False
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            self.sock.settimeout(left)
            try:
                first = self.sock.recv(1, socket.MSG_PEEK)
            except socket.timeout:
                return True
            self.sock.settimeout(20)
            if not first:
                return True
            pid, payload = self._read_one()
            if pid == proto.S_SAID:
                self.kept.append((pid, payload))
                return False
            self.kept.append((pid, payload))

    def close(self):
        self.sock.close()


def chat_server(backend, url, *extra):
    p = Proc.python(EXAMPLES / "chat_server.py", "--host", "127.0.0.1", "--port", "0",
                    "--workers", "2", "--redis", url, *extra, backend=backend)
    port = p.port(r"chat server on 127\.0\.0\.1:(\d+)")
    p.wait_for_line(r"redis backplane: sharing through")
    return p, port


@pytest.fixture
def servers(backend):
    made = []

    def start(url, n=2):
        new = [chat_server(backend, url) for _ in range(n)]
        made.extend(p for p, _ in new)
        return new

    yield start
    for p in made:
        if p.p.poll() is None:
            p.signal(signal.SIGINT)           # Ctrl-C: a clean stop, redis or not
            assert p.wait() == 0, p.output
        p.kill()
        assert "Traceback" not in p.output, p.output


def six_in_the_room(ports):
    clients = [Chatter(port) for port in ports for _ in range(3)]
    for c in clients:
        c.join()
    return clients


def test_two_servers_one_room_one_order_and_who(backend, redis_server, servers):
    r = redis_server()
    (a, pa), (b, pb) = servers(r.url())
    clients = six_in_the_room([pa, pb])
    try:
        nicks = sorted(c.nick for c in clients)
        assert len(set(nicks)) == 6            # guests carry their server's tag
        for c in (clients[0], clients[5]):
            assert c.who() == nicks
        n = 15
        for k in range(n):
            for c in clients:
                c.say(f"m{k}")
        heard = [c.said(n * 6) for c in clients]
        assert all(h == heard[0] for h in heard), "not one order"
        for c in clients:
            assert [t for t in heard[0] if t.split()[0] == c.nick] == \
                [f"{c.nick} m{k}" for k in range(n)]
    finally:
        for c in clients:
            c.close()


def test_redis_restart_local_chat_goes_on_and_sharing_resumes(backend, redis_server,
                                                             servers):
    r = redis_server()
    (a, pa), (b, pb) = servers(r.url())
    clients = six_in_the_room([pa, pb])
    on_a, on_b = clients[:3], clients[3:]
    try:
        clients[0].say("before")
        assert all(c.said(1) == [f"{clients[0].nick} before"] for c in clients)
        r.stop()
        a.wait_for_line(r"is unreachable", timeout=10)
        b.wait_for_line(r"is unreachable", timeout=10)
        for k in range(5):
            on_a[1].say(f"during {k}")
        want = [f"{on_a[1].nick} during {k}" for k in range(5)]
        assert all(c.said(5) == want for c in on_a)       # local chat went on
        assert all(c.silent(0.5) for c in on_b)           # not shared meanwhile
        assert on_a[0].who() == sorted(c.nick for c in on_a)
        r.start()
        t0 = time.monotonic()
        a.wait_for_line(r"sharing again", timeout=15)
        b.wait_for_line(r"sharing again", timeout=15)
        assert time.monotonic() - t0 < 10
        on_b[2].say("after")
        assert all(c.said(1) == [f"{on_b[2].nick} after"] for c in clients)
        assert on_a[0].who() == sorted(c.nick for c in clients)   # registered again
        for p in (a, b):
            assert len([ln for ln in p.lines if "is unreachable" in ln]) == 1, p.output
    finally:
        for c in clients:
            c.close()


def test_a_killed_server_leaves_who_within_the_ttl(backend, redis_server, servers):
    r = redis_server()
    (a, pa), (b, pb) = servers(r.url())
    clients = six_in_the_room([pa, pb])
    on_a = clients[:3]
    try:
        assert on_a[0].who() == sorted(c.nick for c in clients)
        b.p.kill()                                        # SIGKILL: no goodbye
        t0 = time.monotonic()
        # Asked 5 times a second: the server answers a client's WHO at most that often
        # (past a burst, --query-rate).
        while on_a[0].who() != sorted(c.nick for c in on_a):
            assert time.monotonic() - t0 < TTL + 5, "the killed server's members still in WHO"
            time.sleep(0.2)
        gone_after = time.monotonic() - t0
        # Within the TTL (plus the polling step and a loaded machine's slack).
        assert gone_after < TTL + 1.5, gone_after
        on_a[2].say("still here")
        assert all(c.said(1) == [f"{on_a[2].nick} still here"] for c in on_a)
    finally:
        for c in clients:
            c.close()


def test_a_password_in_the_url(backend, redis_server, servers):
    r = redis_server("--requirepass", "pa55")
    (a, pa), (b, pb) = servers(r.url(password="pa55"))
    x, y = Chatter(pa), Chatter(pb)
    try:
        x.join()
        y.join()
        y.say("through auth")
        assert x.said(1) == y.said(1) == [f"{y.nick} through auth"]
        assert x.who() == sorted([x.nick, y.nick])
    finally:
        x.close()
        y.close()


def test_who_lists_only_names_the_protocol_allows(backend, redis_server, servers):
    """WHO lists every server's members as Redis has them, and Redis may hold names no
    chat server takes (1 to 32 bytes, printable, no spaces): another application on the
    same Redis, or a peer writing the presence hash directly.  A name over a str8's 255
    bytes made proto.who_list raise in the Who callback (the asker never answered),
    then was left out silently; one of 33 to 255 bytes, with a space or an escape
    sequence (for the asker's terminal) was listed.  Now WHO lists only the names the
    protocol allows, and an S_ERROR says how many it left out; the server logs them
    per burst."""
    r = redis_server()
    ((a, pa),) = servers(r.url(), n=1)
    x = Chatter(pa)
    try:
        x.join()
        # Another server's presence, written as the backplane writes it: a live
        # incarnation (its alive key) and its fields in the room's hash.
        bad = ["\u00e9" * 200, "n" * 33, "two words", "\x1b[2Jcleared"]
        fields = []
        for k, name in enumerate(bad + ["ok-name"]):
            fields += [f"other.1|{k:08x}", name]
        assert r.command("SET", "iocpnet:alive:other.1", "1", "PX", 60000) == "OK"
        assert r.command("HSET", f"iocpnet:who:{ROOM}", *fields) == len(bad) + 1
        assert x.who() == sorted([x.nick, "ok-name"])
        reason = proto.Reader(x.until(proto.S_ERROR)).text()
        assert reason.startswith(f"WHO {ROOM}: {len(bad)} names left out"), reason
        a.wait_for_line(r"names in the shared presence that are not nicks")
        # A room name no room can have, as long: an error, not a raise.
        x.sock.sendall(proto.who("r" * 300))
        assert proto.Reader(x.until(proto.S_ERROR)).text().startswith("invalid room name")
    finally:
        x.close()
