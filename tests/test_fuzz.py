"""Property tests of PacketSession's framing against the pure-Python reference parser
(tests/packet_reference.py), on arbitrary byte streams split at arbitrary points:

- many examples through ``iocpnet.scan_packets`` (the same C framing the session uses),
  whole and fed piece by piece the way a session's receive buffer grows;
- a few examples through real sessions over a socket, each piece sent on its own.

The C side is also fuzzed with libFuzzer: tests/fuzz/run.sh.
Set IOCPNET_FUZZ_EXAMPLES to run more examples (e.g. 20000 for a long run).
"""
import os
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import iocpnet

import packet_reference as ref
from conftest import connect, wait_for

EXAMPLES = int(os.environ.get("IOCPNET_FUZZ_EXAMPLES", "400"))
SESSION_EXAMPLES = max(EXAMPLES // 13, 10)


# ---- strategies -------------------------------------------------------------------------

def _chunks(max_size):
    """Pieces of a stream: valid packets (a few near the limit), bad headers, garbage."""
    payload_cap = max(0, min(max_size, 3000) - 4)
    valid = st.builds(ref.encode, st.integers(0, 0xFFFF), st.binary(max_size=payload_cap))
    near_limit = st.builds(lambda pid, extra: ref.encode(pid, b"L" * (max_size - 4 - extra)),
                           st.integers(0, 0xFFFF), st.integers(0, 3))
    too_small = st.builds(lambda s, pid: bytes([s, 0, pid & 0xFF, pid >> 8]),
                          st.integers(0, 3), st.integers(0, 0xFFFF))
    too_large = st.builds(lambda s, pid: bytes([s & 0xFF, s >> 8, pid & 0xFF, pid >> 8]),
                          st.integers(max_size + 1, 0xFFFF) if max_size < 0xFFFF
                          else st.just(3), st.integers(0, 0xFFFF))
    garbage = st.binary(min_size=1, max_size=40)
    parts = [valid, valid, valid, too_small, too_large, garbage]
    if max_size <= 4000:
        parts.append(near_limit)
    return st.one_of(*parts)


@st.composite
def streams(draw, max_size=None):
    if max_size is None:
        max_size = draw(st.one_of(st.integers(4, 64), st.integers(65, 4096),
                                  st.just(0xFFFF)))
    data = b"".join(draw(st.lists(_chunks(max_size), max_size=12)))
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=10))))
    pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
    return max_size, data, [p for p in pieces if p]


def feed(pieces, max_size):
    """Feed pieces as a session's receive buffer grows: scan what is buffered, consume
    whole packets, keep the rest for the next piece; stop at the first error."""
    buf = b""
    got = []
    for piece in pieces:
        buf += piece
        packets, consumed, error = iocpnet.scan_packets(buf, max_size)
        got += packets
        if error is not None:
            return got, buf[consumed:], error
        buf = buf[consumed:]
    return got, buf, None


# ---- scan_packets: many examples ------------------------------------------------------

@settings(max_examples=EXAMPLES, deadline=None)
@given(streams())
def test_scan_packets_matches_the_reference(case):
    max_size, data, pieces = case
    want_packets, want_consumed, bad = ref.parse(data, max_size)
    packets, consumed, error = iocpnet.scan_packets(data, max_size)
    assert packets == want_packets
    assert consumed == want_consumed
    if bad is None:
        assert error is None
    else:
        assert bad.matches(error), (bad, error)
    # Any bytes-like input gives the same result.
    assert iocpnet.scan_packets(bytearray(data), max_size) == (packets, consumed, error)
    assert iocpnet.scan_packets(memoryview(data), max_size) == (packets, consumed, error)


@settings(max_examples=EXAMPLES, deadline=None)
@given(streams())
def test_framing_does_not_depend_on_where_the_stream_is_split(case):
    max_size, data, pieces = case
    want_packets, want_consumed, bad = ref.parse(data, max_size)
    got, left, error = feed(pieces, max_size)
    assert got == want_packets
    if bad is None:
        assert error is None
        assert left == data[want_consumed:]
    else:
        assert bad.matches(error), (bad, error)
        # The session stops at the bad header: what it holds starts there.
        assert left[:4] == data[bad.offset:bad.offset + 4]


def test_scan_packets_edges():
    assert iocpnet.scan_packets(b"") == ([], 0, None)
    assert iocpnet.scan_packets(b"\x04\x00\x07\x00") == ([(7, b"")], 4, None)
    assert iocpnet.scan_packets(b"\x05\x00\x07") == ([], 0, None)       # partial header
    big = ref.encode(1, b"x" * (0xFFFF - 4))
    assert iocpnet.scan_packets(big) == ([(1, b"x" * (0xFFFF - 4))], 0xFFFF, None)
    assert iocpnet.scan_packets(big, 0xFFFE)[2].startswith("bad packet: size 65535 exceeds")
    with pytest.raises(ValueError):
        iocpnet.scan_packets(b"", 3)
    with pytest.raises(ValueError):
        iocpnet.scan_packets(b"", 0x10000)


# ---- real sessions over a socket: a few examples ---------------------------------------

SESSION_MAX = 2048


class _Seen:
    def __init__(self):
        self.lock = threading.Lock()
        self.by_port = {}            # peer port -> {"packets": [...], "reasons": [...]}

    def entry(self, session):
        with self.lock:
            return self.by_port.setdefault(session.address[1],
                                           {"packets": [], "reasons": []})


def _session_class(seen):
    class Recording(iocpnet.PacketSession):
        max_packet_size = SESSION_MAX

        def OnConnected(self):
            self.seen = seen.entry(self)

        def OnRecvPacket(self, packet_id, payload):
            self.seen["packets"].append((packet_id, payload))

        def OnDisconnected(self, reason):
            self.seen["reasons"].append(reason)

    return Recording


def test_sessions_frame_a_split_stream_like_the_reference(server):
    """Each example is one connection to one server (made once per backend), its
    pieces sent one by one, then a FIN."""
    seen = _Seen()
    srv = server(_session_class(seen), accepts=8)
    address = srv.address
    del srv          # hypothesis may keep the last example's locals: keep no server there

    @settings(max_examples=SESSION_EXAMPLES, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=streams(max_size=SESSION_MAX))
    def one_connection(case):
        max_size, data, pieces = case
        want_packets, want_consumed, bad = ref.parse(data, max_size)
        with connect(address) as c:
            port = c.getsockname()[1]
            try:
                for piece in pieces:
                    c.sendall(piece)
                    time.sleep(0.002)        # let each piece be a receive of its own
                c.shutdown(socket.SHUT_WR)
            except OSError:
                assert bad is not None       # reset after a bad packet: expected
            wait_for(lambda: port in seen.by_port and seen.by_port[port]["reasons"], 10,
                     "the session to end")
        got = seen.by_port[port]
        assert got["packets"] == want_packets
        (reason,) = got["reasons"]
        if bad is not None:
            assert bad.matches(reason), (bad, reason)
        elif want_consumed < len(data):
            assert reason == (f"peer closed the connection ({len(data) - want_consumed} "
                              f"bytes of an unfinished message left)")
        else:
            assert reason == "peer closed the connection"

    one_connection()


# ---- the WebSocket frame parser ----------------------------------------------------------
# iocpnet.parse_websocket_frames runs the C parser every WebSocket session runs; it is
# compared with tests/ws_reference.py (written from RFC 6455 alone), whole and fed in
# pieces, and a few examples go through real sessions.  libFuzzer: tests/fuzz/ws_fuzz.c.

import ws_reference as wsref  # noqa: E402
from ws_raw import frame as ws_frame, close_payload  # noqa: E402

_WS_TEXT = st.text(max_size=40).map(lambda t: t.encode("utf-8"))


def _ws_frames(server):
    mask = st.just(server)
    ok_data = st.builds(lambda op, p, fin, m: ws_frame(op, p, fin=fin, mask=m),
                        st.sampled_from([0, 1, 2]), st.one_of(_WS_TEXT, st.binary(max_size=300)),
                        st.booleans(), mask)
    control = st.builds(lambda op, p, m: ws_frame(op, p, mask=m), st.sampled_from([9, 10]),
                        st.binary(max_size=125), mask)
    close = st.builds(lambda code, r, m: ws_frame(8, close_payload(code, r), mask=m),
                      st.one_of(st.sampled_from([1000, 1001, 1008, 3000, 4999]),
                                st.integers(0, 5100)),
                      st.one_of(_WS_TEXT, st.binary(max_size=10)), mask)
    bad = st.one_of(
        st.builds(lambda op, p, rsv, fin, m: ws_frame(op, p, fin=fin, rsv=rsv, mask=m),
                  st.integers(0, 15), st.binary(max_size=130), st.integers(0, 7),
                  st.booleans(), st.booleans()),
        st.binary(min_size=1, max_size=20),
        st.builds(lambda n, m: ws_frame(2, b"", mask=m, length=n)[:14],
                  st.integers(126, 1 << 21), mask),
    )
    return st.one_of(ok_data, ok_data, ok_data, control, close, bad)


# Made once: a strategy made afresh in every example is validated afresh, which was
# 85 % of this test's time (20 of 24 s for 100 examples).
_WS_FRAME_LISTS = {server: st.lists(_ws_frames(server), max_size=10) for server in (False, True)}


@st.composite
def ws_streams(draw):
    server = draw(st.booleans())
    max_message = draw(st.sampled_from([0, 1, 125, 300, 1000, 1 << 20]))
    data = b"".join(draw(_WS_FRAME_LISTS[server]))
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=8))))
    pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
    return server, max_message, data, [p for p in pieces if p]


@settings(max_examples=EXAMPLES, deadline=None)
@given(ws_streams())
def test_websocket_parser_matches_the_reference(case):
    server, max_message, data, pieces = case
    want, want_error = wsref.parse(data, server, max_message)
    got, error = iocpnet.parse_websocket_frames(data, server, max_message)
    assert got == want
    assert (error[0] if error else None) == want_error, error
    assert iocpnet.parse_websocket_frames(memoryview(data), server, max_message) == \
        (got, error)


def test_websocket_parser_edges():
    f = iocpnet.parse_websocket_frames
    assert f(b"") == ([], None)
    assert f(ws_frame(1, b"")) == ([("text", "")], None)
    assert f(ws_frame(8, b"")) == ([("close", 1005, "")], None)
    assert f(ws_frame(2, b"x" * 11), max_message_size=10)[1][0] == 1009
    assert f(ws_frame(2, b"x" * 10), max_message_size=10) == ([("binary", b"x" * 10)], None)
    assert f(ws_frame(1, b"hi", mask=False), server=False) == ([("text", "hi")], None)
    assert f(ws_frame(1, b"hi"), server=False)[1] == (1002, "masked frame from a server")
    # A control frame between fragments, and a message cut short: nothing yet.
    data = ws_frame(1, b"a", fin=False) + ws_frame(9, b"p") + ws_frame(0, b"b")
    assert f(data) == ([("ping", b"p"), ("text", "ab")], None)
    assert f(data[:-1]) == ([("ping", b"p")], None)
    with pytest.raises(ValueError):
        f(b"", max_message_size=-1)


def test_http_upgrade_parser_bounds():
    req = (b"GET /x HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    r, used = iocpnet.parse_http_request(req + b"\x81\x80")
    assert used == len(req) and r.path == "/x" and r.is_websocket
    assert iocpnet.parse_http_request(req[:-2]) == (None, 0)
    with pytest.raises(ValueError, match="^431"):
        iocpnet.parse_http_request(b"GET / HTTP/1.1\r\nX: " + b"a" * 9000)
    with pytest.raises(ValueError, match="^431"):
        iocpnet.parse_http_request(req.replace(b"\r\n\r\n", b"\r\n" + b"X: y\r\n" * 70 +
                                               b"\r\n"))
    assert iocpnet.websocket_accept_key("dGhlIHNhbXBsZSBub25jZQ==") == \
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="        # the example of RFC 6455 1.3


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=600), st.integers(64, 700), st.integers(1, 20))
def test_http_upgrade_parser_never_fails_unexpectedly(data, max_size, max_headers):
    """Arbitrary bytes: a request, 'not yet', or a ValueError with a 4xx status;
    never another exception, never more than max_size bytes used."""
    try:
        r, used = iocpnet.parse_http_request(data, max_size, max_headers)
    except ValueError as e:
        assert str(e)[:3] in ("400", "431")
        return
    assert used <= max_size
    assert (r is None) == (used == 0)
