"""Flood protection, on every backend: per-session message and byte rates (a flooder is
cut with its reason while 20 good clients, checked byte for byte, lose nothing), and at
accept the connection rate and the live sessions per remote address (several 127.0.0.x
source addresses), with the per-address table bounded.

Server sessions report by a serial given in OnConnected, never by keeping the session
(the no_leaks fixture would see it)."""
import collections
import itertools
import logging
import os
import re
import socket
import struct
import threading
import time

import pytest

import iocpnet

from conftest import connect, assert_logged_per_burst, logged_per_burst, recv_exactly, wait_for

GOOD_CLIENTS = 20


class Log:
    def __init__(self):
        self.lock = threading.Lock()
        self.serials = itertools.count(1)
        self.host = {}                                  # serial -> peer host
        self.reasons = {}                               # serial -> reason
        self.handled = collections.Counter()            # serial -> messages handled

    def connected(self, session):
        session.serial = next(self.serials)
        with self.lock:
            self.host[session.serial] = session.address[0]

    def disconnected(self, session, reason):
        with self.lock:
            self.reasons[getattr(session, "serial", 0)] = reason

    def handle(self, session):
        with self.lock:
            self.handled[session.serial] += 1


def packet_echo(log, **attrs):
    def OnConnected(self):
        log.connected(self)

    def OnRecvPacket(self, packet_id, payload):
        log.handle(self)
        self.SendPacket(packet_id, payload)

    def OnDisconnected(self, reason):
        log.disconnected(self, reason)

    ns = dict(OnConnected=OnConnected, OnRecvPacket=OnRecvPacket,
              OnDisconnected=OnDisconnected, **attrs)
    return type("LimitedPacketEcho", (iocpnet.PacketSession,), ns)


def stream_echo(log, greet=None, **attrs):
    def OnConnected(self):
        log.connected(self)
        if greet is not None:
            self.Send(greet)

    def OnRecv(self, data):
        log.handle(self)
        self.Send(data)

    def OnDisconnected(self, reason):
        log.disconnected(self, reason)

    ns = dict(OnConnected=OnConnected, OnRecv=OnRecv, OnDisconnected=OnDisconnected,
              **attrs)
    return type("LimitedEcho", (iocpnet.Session,), ns)


def packet(pid, payload):
    return struct.pack("<HH", len(payload) + 4, pid) + payload


def run_good_clients(address, work, n=GOOD_CLIENTS):
    """Run work(index, sock) for n clients at once; returns the errors."""
    errors = []
    start = threading.Barrier(n)

    def client(i):
        try:
            with connect(address) as s:
                start.wait(10)
                work(i, s)
        except BaseException as e:  # reported by the test
            errors.append(f"client {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, errors


def read_until_closed(sock, timeout=10):
    """Read until EOF or reset; True if the server closed it."""
    sock.settimeout(timeout)
    try:
        while sock.recv(1 << 16):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    return True


def rate_warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "rate limit:" in r.getMessage()]


# ---------------------------------------------------------------------------------------
# Per session

def test_a_flood_of_rate_limit_cuts_is_logged_once_per_burst(server, recorder,
                                                             caplog_iocpnet):
    # A peer over a session's rate, connection after connection, wrote a WARNING per
    # connection ("disconnecting ...: rate limit: ..."): each is cut as before, and the
    # log has a burst's first lines and one line counting the rest, as for bad packets.
    class Limited(iocpnet.Session):
        recv_bytes_per_second = 100
        recv_bytes_burst = 100

        def OnDisconnected(self, reason):
            recorder.on_disconnected(self, reason)

    srv = server(Limited)
    n = 60
    for _ in range(n):
        with connect(srv.address) as c:
            # Chunks of 10 times the burst until cut (the first passes from the full
            # bucket and leaves it in debt; the next one received is refused).
            c.settimeout(0.01)
            deadline = time.monotonic() + 10
            try:
                while time.monotonic() < deadline:
                    c.sendall(b"x" * 1000)
                    try:
                        if not c.recv(1):
                            break
                    except socket.timeout:
                        pass
            except (ConnectionResetError, BrokenPipeError):
                pass
    recorder.wait_disconnects(n)
    assert all(r.startswith("rate limit: ") for _, r in recorder.disconnected), \
        recorder.disconnected
    full, counts, total = logged_per_burst(caplog_iocpnet, "rate limit disconnects",
                                           r"disconnecting .*: rate limit: ")
    assert_logged_per_burst(full, counts, total, n)


def test_a_flood_of_peers_that_do_not_read_is_logged_once_per_burst(server, recorder,
                                                                    caplog_iocpnet):
    # A peer that connects and never reads while the server sends, connection after
    # connection, wrote a WARNING per connection ("disconnecting ...: send queue limit
    # exceeded ... (the peer is not reading)"): each is cut as before, the log has a
    # burst's first lines and one line counting the rest.
    class Pusher(iocpnet.Session):
        send_queue_limit = 64 * 1024

        def OnConnected(self):
            for _ in range(4000):               # 64 MiB at most: far past the buffers
                if not self.Send(b"x" * 16384):
                    break

        def OnDisconnected(self, reason):
            recorder.on_disconnected(self, reason)

    srv = server(Pusher)
    n = 60
    for i in range(n):
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            c.connect(srv.address)              # and never read
        except ConnectionResetError:
            pass    # cut (a reset) before connect returned: the server was that quick
        recorder.wait_disconnects(i + 1)
        c.close()
    assert all("(the peer is not reading)" in r for _, r in recorder.disconnected), \
        recorder.disconnected
    full, counts, total = logged_per_burst(caplog_iocpnet, "send queue limit disconnects",
                                           r"disconnecting .*: send queue limit exceeded")
    assert_logged_per_burst(full, counts, total, n)


def test_a_flood_of_stalled_sends_is_logged_once_per_burst(server, recorder,
                                                          caplog_iocpnet):
    # Peers that connect and never read while the server sends less than its
    # send_queue_limit: the queue stalls and send_timeout cuts each.  That wrote a WARNING
    # per connection ("disconnecting ...: send stalled: ..."); each is still cut, with
    # its reason and counted, and the log has a burst's first lines and a count.
    payload = b"s" * (8 << 20)                  # more than the kernel's buffers take

    class Stuck(iocpnet.Session):
        send_queue_limit = 16 << 20
        send_timeout = 0.2

        def OnConnected(self):
            self.Send(payload)                  # one object, queued by reference

        def OnDisconnected(self, reason):
            recorder.on_disconnected(self, reason)

    srv = server(Stuck)
    n = 40
    peers = []
    try:
        for _ in range(n):
            c = socket.socket()
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            c.connect(srv.address)              # and never read
            peers.append(c)
        recorder.wait_disconnects(n, timeout=30)
    finally:
        for c in peers:
            c.close()
    assert all(r.startswith("send stalled: ") for _, r in recorder.disconnected), \
        recorder.disconnected
    assert srv.service.send_timeouts == n
    full, counts, total = logged_per_burst(caplog_iocpnet, "send stalled disconnects",
                                           r"disconnecting .*: send stalled: ")
    assert_logged_per_burst(full, counts, total, n)


def test_log_burst_for_an_application_s_own_lines(backend, caplog):
    """iocpnet.LogBurst: an application's own line that a peer can make it repeat (a
    malformed request, a flood of its own rules): the first `lines` of a burst in full,
    then one count line, on the logger given; after a quiet second, in full again."""
    app = logging.getLogger("test_limits.app")
    caplog.set_level(logging.INFO, logger="test_limits.app")
    core = iocpnet.IocpCore(backend)
    worker = None
    try:
        with pytest.raises(TypeError):
            iocpnet.LogBurst(None, "things")
        with pytest.raises(ValueError):
            iocpnet.LogBurst(core, "things", -1)
        burst = iocpnet.LogBurst(core, "bad requests", 3, logger=app)
        def work():
            while core.Dispatch(100) >= 0:
                pass

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        shown = [burst.log(logging.INFO if k % 2 else logging.WARNING, f"bad request {k}")
                 for k in range(20)]
        assert shown == [True] * 3 + [False] * 17
        full, counts, total = logged_per_burst(caplog, "bad requests", r"bad request \d+")
        assert [m for m in full] == ["bad request 0", "bad request 1", "bad request 2"]
        assert total == 20 and len(counts) == 1
        assert counts[0].string.endswith("(the last: bad request 19)"), counts[0].string
        (rec,) = [r for r in caplog.records if r.getMessage().startswith("... and")]
        assert rec.name == "test_limits.app" and rec.levelno == logging.WARNING
        assert burst.log(logging.INFO, "bad request again")     # quiet: in full again
    finally:
        core.Close(5)
        if worker is not None:
            worker.join(10)


def test_log_burst_flush_writes_the_count_now(backend, caplog):
    """LogBurst.flush(): an application that shuts down its own way (or wants the count
    now) writes what the burst holds without waiting for the core's timer (no worker
    runs here, so the timer never fires).  Idempotent, nothing written when nothing is
    held, and safe from several threads at once: every event is counted exactly once."""
    app = logging.getLogger("test_limits.flush")
    caplog.set_level(logging.INFO, logger="test_limits.flush")
    counted = re.compile(r"\.\.\. and (\d+) more bad requests in the last [\d.]+ s "
                         r"\(the last: bad request \S+\)$")

    def counts():
        return [int(m.group(1)) for m in map(counted.match, caplog.messages) if m]

    core = iocpnet.IocpCore(backend)
    try:
        burst = iocpnet.LogBurst(core, "bad requests", 2, logger=app)
        assert burst.flush() is False and caplog.messages == []    # nothing held
        for k in range(5):
            burst.log(logging.WARNING, f"bad request {k}")
        assert burst.flush() is True
        assert counts() == [3]
        assert caplog.messages[-1].endswith("(the last: bad request 4)")
        assert burst.flush() is False and counts() == [3]          # idempotent
        # The burst goes on (it ends once quiet for a second): still counted.
        assert burst.log(logging.INFO, "bad request 5") is False
        assert burst.flush() is True and counts() == [3, 1]

        n_threads, per_thread = 4, 200
        start = threading.Barrier(n_threads)

        def hammer(t):
            start.wait(10)
            for k in range(per_thread):
                burst.log(logging.INFO, f"bad request {t}.{k}")
                if k % 7 == 0:
                    burst.flush()

        threads = [threading.Thread(target=hammer, args=(t,)) for t in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        burst.flush()
        assert sum(counts()) == 3 + 1 + n_threads * per_thread, counts()
    finally:
        core.Close(5)


def test_packet_flooder_is_cut_by_its_message_rate(server, caplog_iocpnet):
    """A PacketSession counts packets: a peer sending 5000 packets at once is cut after
    its burst (400) plus what the rate refilled meanwhile; 20 good clients sending 100
    packets each (under the burst, so never at risk) get every packet back unchanged."""
    log = Log()
    cls = packet_echo(log, recv_messages_per_second=200, recv_messages_burst=400)
    srv = server(cls, accepts=32)

    def good(i, s):
        for rnd in range(10):
            sent = [packet(i, os.urandom(1 + (rnd * 7 + k) % 50)) for k in range(10)]
            s.sendall(b"".join(sent))
            for p in sent:
                assert recv_exactly(s, len(p)) == p

    threads, errors = run_good_clients(srv.address, good)
    flooder = connect(srv.address)
    t0 = time.monotonic()
    try:
        flooder.sendall(b"".join(packet(7, b"x" * 8) for _ in range(5000)))
    except (ConnectionResetError, BrokenPipeError):
        pass
    read_until_closed(flooder)
    elapsed = time.monotonic() - t0
    flooder.close()
    for t in threads:
        t.join(60)
    assert not errors, errors
    wait_for(lambda: srv.service.session_count == 0, 10, "every session to end")

    cut = {s: r for s, r in log.reasons.items() if r.startswith("rate limit")}
    assert len(cut) == 1, log.reasons
    (serial, reason), = cut.items()
    assert "messages/s over recv_messages_per_second 200 (" in reason, reason
    assert "burst 400)" in reason, reason
    handled = log.handled[serial]
    assert 400 <= handled <= 400 + 200 * elapsed + 1, (handled, elapsed)
    good_reasons = [r for s, r in log.reasons.items() if s != serial]
    assert good_reasons == ["peer closed the connection"] * GOOD_CLIENTS
    warned = rate_warnings(caplog_iocpnet)
    assert len(warned) == 1 and reason in warned[0], warned
    st = srv.service.stats()
    assert st["disconnects"]["limit"] == 1
    assert st["disconnects"]["peer_closed"] == GOOD_CLIENTS
    # Every packet handled was counted, and the one that went over the rate too.
    assert st["messages_in"] == GOOD_CLIENTS * 100 + handled + 1
    assert st["messages_out"] == GOOD_CLIENTS * 100 + handled


def test_stream_flooder_is_cut_by_its_byte_rate(server):
    """A plain Session: a peer pushing 8 MiB as fast as it can is cut once it has sent
    its 128 KiB burst plus 64 KiB/s; good clients echoing 64 KiB each get it all back."""
    log = Log()
    cls = stream_echo(log, recv_bytes_per_second=64 * 1024, recv_bytes_burst=128 * 1024)
    srv = server(cls, accepts=32)

    def good(i, s):
        data = os.urandom(64 * 1024)
        for k in range(0, len(data), 4096):
            s.sendall(data[k:k + 4096])
            assert recv_exactly(s, 4096) == data[k:k + 4096]

    threads, errors = run_good_clients(srv.address, good)
    flooder = connect(srv.address)
    t0 = time.monotonic()
    blob = b"\xab" * (1 << 20)
    try:
        for _ in range(8):
            flooder.sendall(blob)
    except (ConnectionResetError, BrokenPipeError):
        pass
    read_until_closed(flooder)
    elapsed = time.monotonic() - t0
    flooder.close()
    for t in threads:
        t.join(60)
    assert not errors, errors
    wait_for(lambda: srv.service.session_count == 0, 10, "every session to end")
    cut = [r for r in log.reasons.values() if r.startswith("rate limit")]
    assert len(cut) == 1, log.reasons
    assert "bytes/s over recv_bytes_per_second 65536 (" in cut[0], cut
    assert "burst 131072)" in cut[0], cut
    assert sorted(log.reasons.values()).count("peer closed the connection") == GOOD_CLIENTS
    st = srv.service.stats()
    assert st["disconnects"]["limit"] == 1
    # What the flooder got through: its burst and the refill, plus the chunk that
    # went over (at most one receive buffer).
    flood_in = st["bytes_in"] - GOOD_CLIENTS * 64 * 1024
    assert 128 * 1024 <= flood_in <= 128 * 1024 + 64 * 1024 * elapsed + 64 * 1024, \
        (flood_in, elapsed)


def test_stream_message_rate_counts_receives(server):
    """A plain Session's message is one receive (one OnRecv): a peer that waits for each
    echo before sending again makes one receive per message; at 10/s with a burst of 10
    it is cut on the 11th, give or take what the rate refilled.  Good clients doing 5
    round trips are never at risk."""
    log = Log()
    cls = stream_echo(log, recv_messages_per_second=10, recv_messages_burst=10)
    srv = server(cls, accepts=32)

    def good(i, s):
        for k in range(5):
            msg = f"{i}:{k}".encode()
            s.sendall(msg)
            assert recv_exactly(s, len(msg)) == msg

    threads, errors = run_good_clients(srv.address, good)
    pinger = connect(srv.address)
    t0 = time.monotonic()
    echoed = 0
    try:
        for _ in range(2000):
            pinger.sendall(b"p")
            if pinger.recv(1) != b"p":
                break
            echoed += 1
    except (ConnectionResetError, BrokenPipeError):
        pass
    elapsed = time.monotonic() - t0
    pinger.close()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert echoed < 2000, "the pinger was never cut"
    assert 10 <= echoed <= 10 + 10 * elapsed + 1, (echoed, elapsed)
    wait_for(lambda: srv.service.session_count == 0, 10, "every session to end")
    cut = [r for r in log.reasons.values() if r.startswith("rate limit")]
    assert len(cut) == 1 and "over recv_messages_per_second 10 (" in cut[0], log.reasons


@pytest.mark.parametrize("attrs", [
    {"recv_messages_per_second": -1},
    {"recv_bytes_per_second": "fast"},
    {"recv_messages_per_second": 10, "recv_messages_burst": 0.5},
    {"recv_bytes_per_second": True},
])
def test_bad_rate_settings_are_refused_when_the_class_is_used(attrs):
    cls = type("Bad", (iocpnet.Session,), dict(attrs))
    with pytest.raises(ValueError, match="recv_"):
        cls()


# ---------------------------------------------------------------------------------------
# At accept

class Refused:
    """A connection the server reset before connect() returned (a refusal that fast)."""

    def close(self):
        pass


def connect_from(src, address, timeout=10):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((src, 0))
    try:
        s.connect(address)
    except ConnectionResetError:
        s.close()
        return Refused()
    return s


def greeted(sock):
    """True if the server greeted this connection, False if it closed it."""
    if isinstance(sock, Refused):
        return False
    try:
        return recv_exactly(sock, 2) == b"hi"
    except (ConnectionError, OSError):
        return False


def refusal_lines(caplog):
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.getMessage().startswith("refused ")]


def refused_in(line):
    return int(line.split()[1])


def test_connect_flood_from_one_address_is_refused_and_counted(server, caplog_iocpnet):
    """60 connections at once from 127.0.0.2 against 5/s with a burst of 5: at most the
    burst plus the refill are served, the rest refused at once and counted, and logged
    as one line with the count; 10 other addresses connecting meanwhile are all served."""
    log = Log()
    srv = server(stream_echo(log, greet=b"hi"), accepts=32,
                 connect_rate_per_address=5, connect_burst_per_address=5)
    t0 = time.monotonic()
    flood = [connect_from("127.0.0.2", srv.address) for _ in range(60)]
    others = [connect_from(f"127.0.0.{3 + i}", srv.address) for i in range(10)]
    served = [greeted(s) for s in flood]
    # The bucket refills while the server works through the accepts, not only while the
    # client connects (the kernel completes every handshake at once): the refill is
    # bounded by the time until the server had decided the last flood connection.
    elapsed = time.monotonic() - t0
    assert all(greeted(s) for s in others)
    n_served = sum(served)
    assert 5 <= n_served <= 5 + 5 * elapsed + 1, (n_served, elapsed)
    wait_for(lambda: srv.service.stats()["accepts"] == 70, 10, "70 accepts")
    st = srv.service.stats()
    assert st["refused"] == {"max_sessions": 0, "max_sessions_per_address": 0,
                             "connect_rate_per_address": 60 - n_served, "shutdown": 0,
                             "bad_session_class": 0}
    assert st["sessions"]["total"] == n_served + 10
    with log.lock:
        hosts = collections.Counter(log.host.values())
    assert hosts["127.0.0.2"] == n_served
    assert all(hosts[f"127.0.0.{3 + i}"] == 1 for i in range(10))
    # One line per burst, with the count, once a second has passed without a refusal.
    wait_for(lambda: sum(map(refused_in, refusal_lines(caplog_iocpnet))) == 60 - n_served,
             10, f"the refusal log line ({refusal_lines(caplog_iocpnet)})")
    lines = refusal_lines(caplog_iocpnet)
    assert len(lines) <= 2, lines
    assert "connect_rate_per_address: " in lines[0] and "most from 127.0.0.2" in lines[0]
    for s in flood + others:
        s.close()


def test_live_sessions_per_address(server):
    """max_sessions_per_address=3: a 4th connection from 127.0.0.2 is refused, another
    address is not; once one of the three ends, 127.0.0.2 may connect again."""
    log = Log()
    srv = server(stream_echo(log, greet=b"hi"), accepts=16, max_sessions_per_address=3)
    first = [connect_from("127.0.0.2", srv.address) for _ in range(3)]
    assert all(greeted(s) for s in first)
    fourth = connect_from("127.0.0.2", srv.address)
    assert not greeted(fourth)
    other = connect_from("127.0.0.3", srv.address)
    assert greeted(other)
    st = srv.service.stats()
    assert st["refused"]["max_sessions_per_address"] == 1
    assert st["address_table"]["live"] == 2
    first[0].close()
    wait_for(lambda: srv.service.session_count == 3, 10, "the closed session to end")
    again = connect_from("127.0.0.2", srv.address)
    assert greeted(again)
    for s in first[1:] + [fourth, other, again]:
        s.close()
    wait_for(lambda: srv.service.session_count == 0, 10, "every session to end")
    st = srv.service.stats()
    assert st["address_table"]["live"] == 0
    assert st["sessions"]["total"] == 5
    assert st["refused"]["max_sessions_per_address"] == 1


def test_per_address_table_is_bounded(server):
    """A flood from many addresses (here 40 of 127.0.0.0/8) cannot grow the rate table
    past address_table_size: the least recently seen address is forgotten (an
    eviction) and may then start over; one still remembered stays refused."""
    log = Log()
    srv = server(stream_echo(log, greet=b"hi"), accepts=16, address_table_size=8,
                 connect_rate_per_address=0.01, connect_burst_per_address=1)
    for i in range(40):
        s = connect_from(f"127.0.1.{10 + i}", srv.address)
        assert greeted(s), i
        s.close()
        st = srv.service.stats()["address_table"]
        assert st["recent"] <= 8, st
    st = srv.service.stats()
    assert st["address_table"]["recent"] == 8
    assert st["address_table"]["evictions"] == 32
    s = connect_from("127.0.1.49", srv.address)       # remembered: its bucket is empty
    assert not greeted(s)
    s.close()
    s = connect_from("127.0.1.10", srv.address)       # forgotten: a full burst again
    assert greeted(s)
    s.close()
    wait_for(lambda: srv.service.stats()["refused"]["connect_rate_per_address"] == 1, 10,
             "the refusal to be counted")


def test_max_sessions_refusals_are_counted_by_reason(server):
    log = Log()
    srv = server(stream_echo(log, greet=b"hi"), accepts=8, max_sessions=2)
    keep = [connect_from("127.0.0.1", srv.address) for _ in range(2)]
    assert all(greeted(s) for s in keep)
    extra = [connect_from("127.0.0.1", srv.address) for _ in range(3)]
    assert not any(greeted(s) for s in extra)
    st = srv.service.stats()
    assert st["refused"]["max_sessions"] == 3 == srv.service.rejected
    assert st["accepts"] == 5 and st["sessions"]["total"] == 2
    for s in keep + extra:
        s.close()


@pytest.mark.parametrize("kw", [
    {"max_sessions_per_address": -1},
    {"connect_rate_per_address": -2},
    {"connect_rate_per_address": 5, "connect_burst_per_address": 0},
    {"address_table_size": 0},
])
def test_bad_accept_limits_are_refused(backend, kw):
    core = iocpnet.IocpCore(backend)
    try:
        with pytest.raises(ValueError):
            iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), iocpnet.Session, 1,
                            **kw)
    finally:
        core.Close()
