"""PacketSession framing, PacketHandler routing, make_packet / SendPacket, and
Broadcast: what a game server relies on to get each packet once, whole and in order."""
import asyncio
import logging
import socket
import threading
import time

import pytest

import iocpnet
import packet_reference as ref

from conftest import (connect, assert_logged_per_burst, logged_per_burst,
                      recv_exactly, recv_until_eof)

# The line of a session cut for a bad packet (a bad size or an unknown id).
BAD_PACKET_LINE = r"disconnecting .*: (bad packet: size|unknown packet id)"

SYNC = 0xFFFE           # the tests' "tell me you got everything so far" packet


def read_packets(sock, n):
    """Read exactly n whole packets from a plain socket."""
    out = []
    for _ in range(n):
        header = recv_exactly(sock, 4)
        size = header[0] | header[1] << 8
        pid = header[2] | header[3] << 8
        out.append((pid, recv_exactly(sock, size - 4)))
    return out


def closed_by_server(sock):
    """True once the server has closed: EOF, or the reset a bad packet earns."""
    try:
        return recv_until_eof(sock) is not None
    except ConnectionResetError:
        return True


def recording_packet_session(received, recorder=None, **attrs):
    """A PacketSession class that records (id, payload) and answers SYNC packets."""

    class Recording(iocpnet.PacketSession):
        def OnRecvPacket(self, packet_id, payload):
            received.append((packet_id, payload))
            if packet_id == SYNC:
                self.SendPacket(SYNC, payload)

        def OnDisconnected(self, reason):
            if recorder is not None:
                recorder.on_disconnected(self, reason)

    for k, v in attrs.items():
        setattr(Recording, k, v)
    return Recording


# A stream with empty payloads, a packet of exactly max_packet_size, the largest id.
SMALL_MAX = 64
STREAM_PACKETS = [(1, b""), (2, b"a"), (3, b"hello, packets"), (4, b""),
                  (5, bytes(range(SMALL_MAX - 4))), (6, b"xyz"), (0xFFFF, b"")]
STREAM = b"".join(ref.encode(pid, payload) for pid, payload in STREAM_PACKETS)


def test_scan_packets_at_every_split_point():
    """scan_packets over a prefix, then over the rest from where it stopped, finds
    exactly the packets of the whole stream, wherever the cut is."""
    assert ref.parse(STREAM, SMALL_MAX) == (STREAM_PACKETS, len(STREAM), None)
    for k in range(len(STREAM) + 1):
        first, used, err = iocpnet.scan_packets(STREAM[:k], SMALL_MAX)
        assert err is None
        assert (first, used) == ref.parse(STREAM[:k], SMALL_MAX)[:2], k
        rest, used2, err2 = iocpnet.scan_packets(STREAM[used:], SMALL_MAX)
        assert err2 is None and used + used2 == len(STREAM), k
        assert first + rest == STREAM_PACKETS, k


def test_packet_boundaries_at_every_split_point(server):
    """The stream is sent in two writes, cut at every byte offset in turn (a SYNC
    packet after each round makes the next cut start on a fresh receive): OnRecvPacket
    sees every packet once, whole and in order, whatever the cut."""
    received = []
    srv = server(recording_packet_session(received, max_packet_size=SMALL_MAX))
    expected = []
    with connect(srv.address) as c:
        for k in range(len(STREAM) + 1):
            sync = ref.encode(SYNC, b"%d" % k)
            c.sendall(STREAM[:k])
            time.sleep(0.001)           # let the first part arrive on its own
            c.sendall(STREAM[k:] + sync)
            assert read_packets(c, 1) == [(SYNC, b"%d" % k)]
            expected += STREAM_PACKETS + [(SYNC, b"%d" % k)]
    assert received == expected


def test_max_size_packet_split_across_receives(server):
    """A 65535-byte packet (the largest the header can say) between small ones, cut in
    the header, in the payload and at its edges, is delivered whole."""
    big = bytes((i * 13) & 0xFF for i in range(iocpnet.PACKET_SIZE_MAX - 4))
    packets = [(7, b""), (8, big), (9, b"z")]
    stream = b"".join(ref.encode(pid, p) for pid, p in packets)
    cuts = sorted(set(list(range(0, 12)) + list(range(len(stream) - 12, len(stream) + 1))
                      + list(range(0, len(stream), 8191))))
    received = []
    srv = server(recording_packet_session(received))
    with connect(srv.address) as c:
        for k in cuts:
            c.sendall(stream[:k])
            time.sleep(0.001)
            c.sendall(stream[k:] + ref.encode(SYNC, b""))
            assert read_packets(c, 1) == [(SYNC, b"")]
    assert received == (packets + [(SYNC, b"")]) * len(cuts)


def _bad_packet_case(srv, received, recorder, caplog, header, expected_reason):
    """A valid packet then a bad header: the valid one is delivered, the session ends
    with the reason (logged), and another session on the server keeps working."""
    with connect(srv.address) as good, connect(srv.address) as bad:
        good.sendall(ref.encode(SYNC, b"before"))
        assert read_packets(good, 1) == [(SYNC, b"before")]
        bad.sendall(ref.encode(1, b"fine") + header + b"trailing bytes never parsed")
        assert closed_by_server(bad)
        recorder.wait_disconnects(1)
        good.sendall(ref.encode(SYNC, b"after"))
        assert read_packets(good, 1) == [(SYNC, b"after")]
    assert (1, b"fine") in received
    assert recorder.disconnected[0][1] == expected_reason
    warnings = [r for r in caplog.records
                if r.levelno == logging.WARNING and expected_reason in r.getMessage()]
    assert warnings, "the bad packet was not logged"


@pytest.mark.parametrize("size", [0, 1, 2, 3])
def test_size_below_header_disconnects_with_reason(server, recorder, caplog_iocpnet, size):
    received = []
    srv = server(recording_packet_session(received, recorder))
    header = bytes([size, 0, 77, 0])
    _bad_packet_case(srv, received, recorder, caplog_iocpnet, header,
                     f"bad packet: size {size} is smaller than the 4-byte header "
                     f"(packet id 77)")


@pytest.mark.parametrize("size", [1025, 0xFFFF])
def test_size_over_max_packet_size_disconnects_with_reason(server, recorder, caplog_iocpnet,
                                                           size):
    received = []
    srv = server(recording_packet_session(received, recorder, max_packet_size=1024))
    header = bytes([size & 0xFF, size >> 8, 5, 0])
    _bad_packet_case(srv, received, recorder, caplog_iocpnet, header,
                     f"bad packet: size {size} exceeds max_packet_size 1024 (packet id 5)")


@pytest.mark.parametrize("tail, left", [(b"\x08\x00", 2), (b"\x0a\x00\x03\x00abc", 7)],
                         ids=["truncated-header", "truncated-payload"])
def test_unfinished_packet_then_close(server, recorder, tail, left):
    """The peer closes in the middle of a packet: the whole ones before it are
    delivered, the piece is not, and the reason says how much was left."""
    received = []
    srv = server(recording_packet_session(received, recorder))
    with connect(srv.address) as c:
        c.sendall(ref.encode(1, b"whole") + tail)
        c.shutdown(socket.SHUT_WR)
        assert recv_until_eof(c) == b""
    recorder.wait_disconnects(1)
    assert received == [(1, b"whole")]
    assert recorder.disconnected[0][1] == (f"peer closed the connection ({left} bytes of "
                                           f"an unfinished message left)")


# ---- PacketHandler ----

def test_packet_handler_routes_and_refuses_duplicates():
    h = iocpnet.PacketHandler()
    calls = []

    @h.route(1)
    def login(session, payload):
        calls.append(("login", session, payload))
        return "logged in"

    @h.route(0xFFFF)
    def last(session, payload):
        calls.append(("last", session, payload))

    assert login.__name__ == "login"          # the decorator gives the function back
    assert h.dispatch("s", 1, b"alice") == "logged in"
    h.dispatch("s", 0xFFFF, b"")
    assert calls == [("login", "s", b"alice"), ("last", "s", b"")]
    assert set(h.routes()) == {1, 0xFFFF}
    h.routes().clear()                        # a copy: the handler keeps its routes
    assert set(h.routes()) == {1, 0xFFFF}
    with pytest.raises(ValueError, match="already routed"):
        h.register(1, lambda s, p: None)
    with pytest.raises(ValueError, match="already routed"):
        h.route(0xFFFF)(lambda s, p: None)
    with pytest.raises(ValueError):
        h.register(0x10000, lambda s, p: None)
    with pytest.raises(ValueError):
        h.register(-1, lambda s, p: None)
    with pytest.raises(TypeError):
        h.register(2, "not callable")
    assert h.dispatch("s", 1, b"bob") == "logged in"      # still routed to the first


def test_packet_handler_routes_on_a_session(server):
    """A PacketSession with ``handler = PacketHandler()``: each id reaches its function
    with the session and the payload, in order."""
    h = iocpnet.PacketHandler()
    seen = []

    @h.route(10)
    def ping(session, payload):
        seen.append(("ping", payload))
        session.SendPacket(11, payload)

    @h.route(20)
    def shout(session, payload):
        seen.append(("shout", payload))
        session.SendPacket(21, payload.upper())

    class Routed(iocpnet.PacketSession):
        handler = h

    srv = server(Routed)
    with connect(srv.address) as c:
        c.sendall(ref.encode(10, b"a") + ref.encode(20, b"hey") + ref.encode(10, b""))
        assert read_packets(c, 3) == [(11, b"a"), (21, b"HEY"), (11, b"")]
    assert seen == [("ping", b"a"), ("shout", b"hey"), ("ping", b"")]


def test_unknown_id_default_disconnects_with_reason(server, recorder, caplog_iocpnet):
    """By default an id without a route ends the session ("unknown packet id N",
    logged); what it queued before still goes out, and nothing after it is handled."""
    h = iocpnet.PacketHandler()
    handled = []

    @h.route(1)
    def echo(session, payload):
        handled.append(payload)
        session.SendPacket(1, payload)

    class Strict(iocpnet.PacketSession):
        handler = h

        def OnDisconnected(self, reason):
            recorder.on_disconnected(self, reason)

    srv = server(Strict)
    with connect(srv.address) as c:
        c.sendall(ref.encode(1, b"a") + ref.encode(99, b"??") + ref.encode(1, b"b"))
        assert recv_until_eof(c) == ref.encode(1, b"a")
    recorder.wait_disconnects(1)
    assert handled == [b"a"]
    assert recorder.disconnected == [("Strict", "unknown packet id 99")]
    assert any("unknown packet id 99" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog_iocpnet.records)


@pytest.mark.parametrize("overridden", [False, True])
def test_a_flood_of_bad_packets_is_logged_once_per_burst(server, recorder, caplog_iocpnet,
                                                         overridden):
    """A peer sending garbage (a bad size, an unknown id), connection after connection:
    each session still ends with its own reason, but the log has a burst's first lines
    and one line counting the rest (as failed TLS handshakes and refused WebSocket
    upgrades do), every failure in its figures.  An OnUnknownPacket of the user's own
    is still called for every unknown id."""
    h = iocpnet.PacketHandler()
    h.route(1)(lambda session, payload: None)
    seen = []

    class Strict(iocpnet.PacketSession):
        handler = h
        max_packet_size = 1024

        def OnDisconnected(self, reason):
            recorder.on_disconnected(self, reason)

    if overridden:
        def OnUnknownPacket(self, packet_id, payload):
            seen.append(packet_id)
            iocpnet.PacketSession.OnUnknownPacket(self, packet_id, payload)
        Strict.OnUnknownPacket = OnUnknownPacket

    srv = server(Strict)
    garbage = [b"\x02\x00\x01\x00",                    # size 2: below the header
               b"\xff\xff\x01\x00" + b"x" * 16,        # 65535 > max_packet_size
               ref.encode(1, b"fine") + ref.encode(7, b"??")]   # an unknown id
    n = 60
    for i in range(n):
        with connect(srv.address) as c:
            c.sendall(garbage[i % 3])
            assert closed_by_server(c)
    recorder.wait_disconnects(n)
    reasons = [r for _, r in recorder.disconnected]
    assert sum(r.startswith("bad packet: size") for r in reasons) == 40, reasons
    assert reasons.count("unknown packet id 7") == 20, reasons
    if overridden:
        assert seen == [7] * 20
    full, counts, total = logged_per_burst(caplog_iocpnet, "bad packets", BAD_PACKET_LINE)
    assert_logged_per_burst(full, counts, total, n)


def test_onrecvpacket_that_raises_disconnects_with_its_traceback(server, recorder,
                                                                  caplog_iocpnet):
    """A hook that raises on one packet of a chunk ends the session with the exception
    as its reason, logged with its traceback; what it sent before still goes out, and no
    later packet of the chunk reaches it."""
    received = []

    class Fragile(recording_packet_session(received, recorder)):
        def OnRecvPacket(self, packet_id, payload):
            if packet_id == 300:         # past CPython's cached small ints
                raise ValueError(f"cannot handle {bytes(payload)!r}")
            super().OnRecvPacket(packet_id, payload)

    with connect(server(Fragile).address) as c:
        c.sendall(ref.encode(SYNC, b"a") + ref.encode(300, b"bad") + ref.encode(2, b"b"))
        assert recv_until_eof(c) == ref.encode(SYNC, b"a")
    recorder.wait_disconnects(1)
    assert received == [(SYNC, b"a")]
    assert recorder.disconnected == [
        ("Fragile", "exception in OnRecvPacket: ValueError: cannot handle b'bad'")]
    logged = [r for r in caplog_iocpnet.records if "OnRecvPacket of" in r.getMessage()]
    assert logged and logged[0].exc_info[0] is ValueError, caplog_iocpnet.records



@pytest.mark.parametrize("how", ["handler-subclass", "unknown-argument", "session-hook"])
def test_unknown_id_overridden_goes_to_one_place(server, recorder, how):
    """Overriding the one unknown place (PacketHandler.on_unknown, the ``unknown=``
    argument, or the session's OnUnknownPacket) keeps the session: it answers instead."""
    unknown = []

    def answer(session, packet_id, payload):
        unknown.append((packet_id, payload))
        session.SendPacket(0, b"unknown %d" % packet_id)

    if how == "handler-subclass":
        class Lenient(iocpnet.PacketHandler):
            def on_unknown(self, session, packet_id, payload):
                answer(session, packet_id, payload)
        h = Lenient()
    elif how == "unknown-argument":
        h = iocpnet.PacketHandler(unknown=answer)
    else:
        h = iocpnet.PacketHandler()

    @h.route(1)
    def one(session, payload):
        session.SendPacket(1, payload)

    class Session(iocpnet.PacketSession):
        handler = h

        def OnDisconnected(self, reason):
            recorder.on_disconnected(self, reason)

    if how == "session-hook":
        Session.OnUnknownPacket = lambda self, pid, payload: answer(self, pid, payload)

    srv = server(Session)
    with connect(srv.address) as c:
        c.sendall(ref.encode(1, b"a") + ref.encode(42, b"x") + ref.encode(1, b"b"))
        assert read_packets(c, 3) == [(1, b"a"), (0, b"unknown 42"), (1, b"b")]
    recorder.wait_disconnects(1)
    assert unknown == [(42, b"x")]
    assert recorder.disconnected[0][1] == "peer closed the connection"


# ---- make_packet and SendPacket ----

def test_make_packet_matches_the_wire_format():
    assert iocpnet.make_packet(0x0102, b"hi") == b"\x06\x00\x02\x01hi"
    assert iocpnet.make_packet(7) == b"\x04\x00\x07\x00"
    assert iocpnet.make_packet(3, bytearray(b"ab")) == ref.encode(3, b"ab")
    assert iocpnet.make_packet(3, memoryview(b"abc")[1:]) == ref.encode(3, b"bc")
    biggest = b"x" * (iocpnet.PACKET_SIZE_MAX - iocpnet.PACKET_HEADER_SIZE)
    assert iocpnet.make_packet(1, biggest) == ref.encode(1, biggest)
    with pytest.raises(ValueError):
        iocpnet.make_packet(1, biggest + b"x")
    with pytest.raises(ValueError):
        iocpnet.make_packet(0x10000)
    with pytest.raises(ValueError):
        iocpnet.make_packet(-1)
    with pytest.raises(TypeError):
        iocpnet.make_packet(1, "text must be encoded first")


def test_send_packet_reaches_the_peer(server):
    class Reverse(iocpnet.PacketSession):
        def OnRecvPacket(self, packet_id, payload):
            assert self.SendPacket(packet_id + 1, payload[::-1])

    srv = server(Reverse)
    with connect(srv.address) as c:
        c.sendall(ref.encode(1, b"abc") + ref.encode(5, b""))
        assert read_packets(c, 2) == [(2, b"cba"), (6, b"")]


# ---- Broadcast ----

BROADCAST_SESSIONS = 500


def test_broadcast_to_500_sessions_exactly_once_in_order(server):
    """Broadcasts interleaved with direct sends, then a Broadcast to a subset, then one
    to all: each of 500 clients gets each packet meant for it exactly once, in the
    order it was sent, and the subset packet reaches the subset only."""
    srv = server(iocpnet.PacketSession, accepts=128)
    rounds = 4
    results = {}
    subset_ports = set()
    plan_done = threading.Event()
    failures = []

    def server_side():
        # Runs once every client is connected: all sends from this one thread, so the
        # order per session is the order of these calls.
        try:
            sessions = srv.service.sessions
            assert len(sessions) == BROADCAST_SESSIONS
            for r in range(rounds):
                packet = iocpnet.make_packet(1, b"broadcast %d" % r)     # built once
                assert srv.service.Broadcast(packet) == BROADCAST_SESSIONS
                for s in sessions:
                    assert s.SendPacket(2, b"direct %d" % r)
            subset = sessions[::3]
            subset_ports.update(s.address[1] for s in subset)
            assert srv.service.Broadcast(iocpnet.make_packet(3, b"subset"),
                                         sessions=subset) == len(subset)
            assert srv.service.Broadcast(iocpnet.make_packet(4, b"end")) == \
                BROADCAST_SESSIONS
        except BaseException as e:          # surfaced below
            failures.append(e)
        finally:
            plan_done.set()

    async def client(i, connected):
        reader, writer = await asyncio.open_connection(*srv.address)
        port = writer.get_extra_info("sockname")[1]
        connected.append(port)
        got = []
        while True:
            header = await reader.readexactly(4)
            size = header[0] | header[1] << 8
            pid = header[2] | header[3] << 8
            got.append((pid, await reader.readexactly(size - 4)))
            if pid == 4:
                break
        results[port] = got
        writer.close()
        await writer.wait_closed()

    async def main():
        connected = []
        tasks = [asyncio.create_task(client(i, connected)) for i in range(BROADCAST_SESSIONS)]
        deadline = time.monotonic() + 30
        while srv.service.session_count < BROADCAST_SESSIONS:
            assert time.monotonic() < deadline, "500 clients did not connect"
            await asyncio.sleep(0.01)
        t = threading.Thread(target=server_side)
        t.start()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        t.join()

    asyncio.run(main())
    assert not failures, failures
    assert plan_done.is_set()
    assert len(results) == BROADCAST_SESSIONS
    base = []
    for r in range(rounds):
        base += [(1, b"broadcast %d" % r), (2, b"direct %d" % r)]
    assert len(subset_ports) == (BROADCAST_SESSIONS + 2) // 3
    for port, got in results.items():
        extra = [(3, b"subset")] if port in subset_ports else []
        assert got == base + extra + [(4, b"end")], port
