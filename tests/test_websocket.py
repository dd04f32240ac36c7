"""WebSocket (RFC 6455): WebSocketSession against the `websockets` library's client and
server (code nobody here wrote), raw frames for every protocol error (each earns its
close code and a logged reason, and the server and its other clients go on), the HTTP
upgrade's refusals, keepalive and close handshakes, and PacketSession's packets over
WebSocket beside native TCP clients in one room.  Every test runs on every backend."""
import asyncio
import contextlib
import logging
import os
import re
import socket
import struct
import threading
import time

import pytest

websockets = pytest.importorskip("websockets")
from websockets.sync.client import connect as ws_connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

import iocpnet  # noqa: E402
import packet_reference as ref  # noqa: E402
import ws_raw  # noqa: E402
from ws_raw import RawClient, close_payload, frame  # noqa: E402

from conftest import (connect, assert_logged_per_burst,  # noqa: E402
                      logged_per_burst, recv_exactly, wait_for)


class WsServer:
    """A Service on 127.0.0.1 (its Listener speaking WebSocket when asked)."""

    def __init__(self, session_cls, backend, websocket_listener=False, workers=2):
        self.core = iocpnet.IocpCore(backend)
        self.listener = iocpnet.Listener(("127.0.0.1", 0), websocket=websocket_listener)
        self.service = iocpnet.Service(self.core, self.listener, session_cls, 16)
        self.threads = []
        self.stopped = False
        self.service.Start()
        for i in range(workers):
            t = threading.Thread(target=self._work, daemon=True)
            t.start()
            self.threads.append(t)

    def _work(self):
        while self.core.Dispatch() >= 0:
            pass

    @property
    def address(self):
        return ("127.0.0.1", self.listener.port)

    @property
    def url(self):
        return f"ws://127.0.0.1:{self.listener.port}"

    def stop(self):
        if self.stopped:
            return
        self.stopped = True
        self.service.Stop(10)
        self.core.Close(10)
        for t in self.threads:
            t.join(10)
        stats = self.core.stats()
        assert stats["in_flight"] == 0 and stats["recv_buffers_out"] == 0, stats


@pytest.fixture
def stack():
    with contextlib.ExitStack() as st:
        yield st


@pytest.fixture
def ws_server(backend):
    made = []

    def make(session_cls, **kw):
        s = WsServer(session_cls, backend, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()
    made.clear()


def echo_class(recorder=None, **attrs):
    class Echo(iocpnet.WebSocketSession):
        def OnMessage(self, data, binary):
            if recorder is not None:
                recorder.add("message", type(data).__name__, len(data), binary)
            self.SendMessage(data)

        def OnDisconnected(self, reason):
            if recorder is not None:
                recorder.on_disconnected(self, reason)

    for k, v in attrs.items():
        setattr(Echo, k, v)
    return Echo


# ---- a library client: what a good client relies on ----------------------------------

def test_websockets_client_text_binary_large_fragmented_ping(ws_server, recorder):
    srv = ws_server(echo_class(recorder))
    with ws_connect(srv.url + "/game?x=1", max_size=None) as ws:
        ws.send("héllo, wörld ✓")
        assert ws.recv() == "héllo, wörld ✓"
        ws.send(b"\x00\xffbinary")
        assert ws.recv() == b"\x00\xffbinary"
        big = os.urandom(1024 * 1024)                    # exactly max_message_size
        ws.send(big)
        assert ws.recv() == big
        ws.send(["frag", "mented ", "text"])             # three frames, one message
        assert ws.recv() == "fragmented text"
        ws.send([b"a" * 70000, b"b" * 5, b""])            # 64-bit length, empty final
        assert ws.recv() == b"a" * 70000 + b"b" * 5
        ws.send("")
        assert ws.recv() == ""
        assert ws.ping(b"are you there").wait(5)
        for i in range(200):                             # many small, in order
            ws.send(f"m{i}")
        assert [ws.recv() for _ in range(200)] == [f"m{i}" for i in range(200)]
    recorder.wait_disconnects(1)
    assert recorder.disconnected == [("Echo", "WebSocket closed by the peer (1000)")]
    kinds = {(e[1], e[3]) for e in recorder.events}
    assert kinds == {("str", False), ("bytes", True)}


@pytest.mark.parametrize("code,reason", [(1000, ""), (1001, "bye"), (4000, "app code"),
                                         (3999, "é" * 40)])
def test_client_close_codes_reach_the_session(ws_server, code, reason):
    seen = []

    class S(iocpnet.WebSocketSession):
        def OnDisconnected(self, r):
            seen.append((self.close_code, self.close_reason, r))

    srv = ws_server(S)
    with ws_connect(srv.url) as ws:
        ws.close(code, reason)
    wait_for(lambda: seen)
    assert seen[0][:2] == (code, reason)
    assert seen[0][2].startswith(f"WebSocket closed by the peer ({code}")


@pytest.mark.parametrize("code,reason", [(1000, "done"), (1008, "policy"), (4321, "")])
def test_server_close_reaches_the_client(ws_server, code, reason):
    done = []

    class S(iocpnet.WebSocketSession):
        def OnMessage(self, data, binary):
            assert self.Close(code, reason)
            assert not self.Close(1000)                  # one close only
            assert not self.SendMessage("after close")   # nothing after it

        def OnDisconnected(self, r):
            done.append(r)

    srv = ws_server(S)
    with ws_connect(srv.url) as ws:
        ws.send("close please")
        with pytest.raises(ConnectionClosed) as ei:
            ws.recv()
        assert ei.value.rcvd.code == code and ei.value.rcvd.reason == reason
    wait_for(lambda: done)
    assert done == [f"WebSocket closed ({code}" + (f" {reason})" if reason else ")")]


def test_close_refuses_bad_codes(ws_server):
    errors = []

    class S(iocpnet.WebSocketSession):
        def OnConnected(self):
            for code in (999, 1005, 1006, 1015, 2000, 5000):
                try:
                    self.Close(code)
                except ValueError:
                    errors.append(code)
            try:
                self.Close(1000, "x" * 124)
            except ValueError:
                errors.append("long")

    srv = ws_server(S)
    with ws_connect(srv.url):
        wait_for(lambda: len(errors) == 7)


def test_disconnect_sends_1000_and_stop_sends_1001(backend):
    class S(iocpnet.WebSocketSession):
        def OnMessage(self, data, binary):
            self.Disconnect("kicked")

    srv = WsServer(S, backend)
    try:
        with ws_connect(srv.url) as ws:
            ws.send("x")
            with pytest.raises(ConnectionClosed) as ei:
                ws.recv()
            assert (ei.value.rcvd.code, ei.value.rcvd.reason) == (1000, "kicked")
        with ws_connect(srv.url) as ws:
            srv.stop()
            with pytest.raises(ConnectionClosed) as ei:
                ws.recv(timeout=5)
            assert (ei.value.rcvd.code, ei.value.rcvd.reason) == (1001, "server shutdown")
    finally:
        srv.stop()


def test_subprotocol_and_origin_policy(ws_server):
    class S(iocpnet.WebSocketSession):
        subprotocols = ("chat.v2", "chat.v1")
        origins = ("https://game.example",)

        def OnConnected(self):
            self.SendMessage(f"{self.subprotocol} {self.request.path}")

    srv = ws_server(S)
    with ws_connect(srv.url + "/p", origin="https://game.example",
                    subprotocols=["chat.v1", "other"]) as ws:
        assert ws.subprotocol == "chat.v1"
        assert ws.recv() == "chat.v1 /p"
    with ws_connect(srv.url + "/q", origin="https://game.example") as ws:
        assert ws.subprotocol is None
        assert ws.recv() == "None /q"
    with pytest.raises(websockets.exceptions.InvalidStatus) as ei:
        ws_connect(srv.url, origin="https://evil.example")
    assert ei.value.response.status_code == 403


def test_on_upgrade_hook_decides_path_and_serves_pages(ws_server, caplog_iocpnet):
    class S(iocpnet.WebSocketSession):
        def OnUpgrade(self, request):
            if request.path == "/":
                return iocpnet.HttpResponse(200, "<h1>page</h1>", "text/html")
            if request.path != "/ws":
                return iocpnet.HttpResponse(404, "no such path")
            return None

        def OnMessage(self, data, binary):
            self.SendMessage(data)

    srv = ws_server(S)
    s = connect(srv.address)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, rest = ws_raw.read_head(s)
    body = rest + recv_until_eof_or_reset(s)
    assert status == 200 and headers["content-type"] == "text/html"
    assert body == b"<h1>page</h1>"
    s.close()
    with pytest.raises(websockets.exceptions.InvalidStatus) as ei:
        ws_connect(srv.url + "/nope")
    assert ei.value.response.status_code == 404
    with ws_connect(srv.url + "/ws") as ws:
        ws.send("ok")
        assert ws.recv() == "ok"


def recv_until_eof_or_reset(sock):
    buf = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return buf
            buf += chunk
    except ConnectionResetError:
        return buf


# ---- the upgrade's refusals ------------------------------------------------------------

GOOD_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def _req(*lines):
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


BASE = ["Host: x", "Upgrade: websocket", "Connection: Upgrade",
        f"Sec-WebSocket-Key: {GOOD_KEY}", "Sec-WebSocket-Version: 13"]

BAD_REQUESTS = [
    (_req("GET / HTTP/1.1", "Host: x"), 426, "Upgrade: websocket"),
    (_req("GET / HTTP/1.1", *BASE[:4], "Sec-WebSocket-Version: 8"), 426,
     "Sec-WebSocket-Version"),
    (_req("GET / HTTP/1.1", *BASE[:3], "Sec-WebSocket-Version: 13"), 400,
     "Sec-WebSocket-Key"),
    (_req("GET / HTTP/1.1", *BASE[:3], "Sec-WebSocket-Key: short",
          "Sec-WebSocket-Version: 13"), 400, "Sec-WebSocket-Key"),
    (_req("GET / HTTP/1.0", *BASE), 400, "HTTP/1.1"),
    (_req("GET /", *BASE), 400, "request line"),
    (_req("GET / HTTP/1.1", "Bad Header Name: x", *BASE), 400, "header line"),
    (_req("GET / HTTP/1.1", " folded", *BASE), 400, "header line"),
    (_req("GET / HTTP/1.1", "X: a\x01b", *BASE), 400, "control character"),
    (_req("POST / HTTP/1.1", *BASE), 405, "GET only"),
    (_req("GET / HTTP/1.1", *[f"X-{i}: {i}" for i in range(70)], *BASE), 431,
     "header fields"),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 9000, 431, "max_header_size"),
]


@pytest.mark.parametrize("request_bytes,status,why", BAD_REQUESTS,
                         ids=[f"{s}-{w}" for _, s, w in BAD_REQUESTS])
def test_bad_upgrade_gets_a_clear_answer_and_the_server_goes_on(
        ws_server, recorder, caplog_iocpnet, stack, request_bytes, status, why):
    srv = ws_server(echo_class(recorder))
    good = stack.enter_context(ws_connect(srv.url))     # a good client, beside the bad one
    s = connect(srv.address)
    s.sendall(request_bytes)
    got, headers, rest = ws_raw.read_head(s)
    body = (rest + recv_until_eof_or_reset(s)).decode()
    s.close()
    assert got == status
    assert why in body
    if status == 426:
        assert headers["sec-websocket-version"] == "13"
    recorder.wait_disconnects(1)
    assert recorder.disconnected[0][1].startswith(f"WebSocket upgrade refused: {status}")
    assert any(f"WebSocket upgrade refused: {status}" in r.getMessage()
               for r in caplog_iocpnet.records)
    good.send("still here")
    assert good.recv() == "still here"


def test_a_flood_of_bad_upgrades_is_logged_once_per_burst(ws_server, recorder,
                                                          caplog_iocpnet):
    # Each refused upgrade wrote a WARNING: a peer connecting to a WebSocket listener and
    # sending garbage, again and again, wrote one line per connection.  As for failed TLS
    # handshakes: a burst's first lines, then one line counting the rest.
    srv = ws_server(echo_class(recorder))
    n = 60
    for i in range(n):
        with connect(srv.address) as s:
            s.sendall(BAD_REQUESTS[i % 3][0])
            recv_until_eof_or_reset(s)
    recorder.wait_disconnects(n)
    full, counts, total = logged_per_burst(caplog_iocpnet, "refused WebSocket upgrades",
                                           r"disconnecting .*: WebSocket upgrade refused")
    assert_logged_per_burst(full, counts, total, n)


def test_a_flood_of_bad_frames_is_logged_once_per_burst(ws_server, recorder,
                                                       caplog_iocpnet):
    # A peer that completes the upgrade and then sends a bad frame (or a text message to
    # a binary endpoint), connection after connection, wrote a WARNING per connection.
    # As for refused upgrades: a burst's first lines, then one line counting the rest.
    srv = ws_server(echo_class(recorder))
    bad = [frame(1, b"hi", mask=False), frame(2, b"hi", rsv=4), frame(3, b"")]
    n = 60
    for i in range(n):
        c = RawClient(srv.address)
        try:
            assert c.status == 101
            c.send(bad[i % 3])
            assert c.read_close()[0] == 1002
        finally:
            c.close()
    recorder.wait_disconnects(n)
    full, counts, total = logged_per_burst(caplog_iocpnet, "WebSocket protocol errors",
                                           r"disconnecting .*: WebSocket error 1002")
    assert_logged_per_burst(full, counts, total, n)


def test_a_flood_of_silent_peers_is_logged_once_per_burst(ws_server, recorder,
                                                         caplog_iocpnet):
    # Peers that connect to a WebSocket listener and never send the upgrade request:
    # each is cut at handshake_timeout, which wrote a line per connection.  Each is
    # still cut, with its reason; the log has a burst's first lines and a count.
    srv = ws_server(echo_class(recorder, handshake_timeout=0.2))
    _flood_of_cut_peers(srv, recorder, caplog_iocpnet, connect,
                        "WebSocket handshake timed out after 0.2 s",
                        "failed WebSocket handshakes",
                        r"disconnecting .*: WebSocket handshake timed out")


def _flood_of_cut_peers(srv, recorder, caplog, make_peer, reason, what, line, n=40):
    """n peers made by make_peer(address) that the server cuts by itself, each with
    `reason`; the log has a burst's first lines and a count (conftest.logged_per_burst)."""
    peers = []
    try:
        for _ in range(n):
            peers.append(make_peer(srv.address))
        recorder.wait_disconnects(n)
    finally:
        for c in peers:
            c.close()
    assert all(r == reason for _, r in recorder.disconnected), recorder.disconnected
    full, counts, total = logged_per_burst(caplog, what, line)
    assert_logged_per_burst(full, counts, total, n)


def test_a_flood_of_refused_client_handshakes_is_logged_once_per_burst(backend,
                                                                       caplog_iocpnet):
    # Our client against a server that refuses every upgrade (or answers garbage): each
    # failed connection wrote a WARNING, and a client that connects many sessions, or
    # reconnects, to such a server wrote one per attempt.  Each still fails with its
    # reason (OnConnectFailed); the log has a burst's first lines and a count.
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                c, _ = lsock.accept()
            except socket.timeout:
                continue
            with c:
                try:
                    c.settimeout(5)
                    data = b""
                    while b"\r\n\r\n" not in data:
                        d = c.recv(4096)
                        if not d:
                            break
                        data += d
                    c.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    failed = []
    lock = threading.Lock()

    class Client(iocpnet.WebSocketSession):
        def OnConnectFailed(self, reason):
            with lock:
                failed.append(reason)

    n = 40
    core = iocpnet.IocpCore(backend)
    try:
        svc = iocpnet.ClientService(core, f"ws://127.0.0.1:{lsock.getsockname()[1]}/",
                                    Client, n)
        svc.Start(workers=2)
        wait_for(lambda: len(failed) == n, 20, f"{n} refused handshakes")
        assert set(failed) == {"WebSocket handshake refused: HTTP 403 Forbidden"}
        full, counts, total = logged_per_burst(
            caplog_iocpnet, "failed WebSocket handshakes",
            r"disconnecting .*: WebSocket handshake refused: HTTP 403")
        assert_logged_per_burst(full, counts, total, n)
        svc.Stop(5)
    finally:
        core.Close(5)
        stop.set()
        th.join(10)
        lsock.close()


def test_connected_only_after_the_upgrade(ws_server):
    seen = []

    class S(iocpnet.WebSocketSession):
        def OnUpgrade(self, request):
            seen.append(("upgrade", self.connected, self.Send(b"too early"),
                         self.SendMessage("too early")))
            return None

        def OnConnected(self):
            seen.append(("connected", self.connected))

    srv = ws_server(S)
    with ws_connect(srv.url) as ws:
        wait_for(lambda: len(seen) == 2)
        ws.send("x")
    assert seen == [("upgrade", False, False, False), ("connected", True)]


def test_handshake_timeout(ws_server, recorder):
    srv = ws_server(echo_class(recorder, handshake_timeout=0.3))
    s = connect(srv.address)
    s.sendall(b"GET / HTTP/1.1\r\n")            # and nothing more
    recorder.wait_disconnects(1)
    assert recorder.disconnected[0][1] == "WebSocket handshake timed out after 0.3 s"
    s.close()


def test_request_sent_byte_by_byte(ws_server):
    """A head that trickles in (each byte its own receive) is found once whole."""
    srv = ws_server(echo_class())
    s = connect(srv.address)
    req, key = ws_raw.upgrade_request(extra=[f"X-Pad-{i}: {'p' * 50}" for i in range(20)])
    for i in range(len(req)):
        s.sendall(req[i:i + 1])
        if i % 97 == 0:
            time.sleep(0.002)
    status, headers, rest = ws_raw.read_head(s)
    assert status == 101 and headers["sec-websocket-accept"] == ws_raw.accept_key(key)
    s.sendall(frame(1, b"slow but fine"))
    c = RawClient.__new__(RawClient)
    c.sock, c.buf = s, rest
    assert c.read_frame() == (True, 1, b"slow but fine")
    s.close()


def test_frames_pipelined_behind_the_request(ws_server):
    srv = ws_server(echo_class())
    s = connect(srv.address)
    req, key = ws_raw.upgrade_request()
    s.sendall(req + frame(1, b"early") + frame(2, b"bird"))
    c = RawClient.__new__(RawClient)
    c.sock = s
    c.status, c.headers, c.buf = ws_raw.read_head(s)
    assert c.status == 101
    assert c.read_frame() == (True, 1, b"early")
    assert c.read_frame() == (True, 2, b"bird")
    s.close()


# ---- raw frames: every protocol error ----------------------------------------------------

PROTOCOL_ERRORS = [
    ("unmasked", frame(1, b"hi", mask=False), 1002, "unmasked frame from a client"),
    ("rsv1", frame(1, b"hi", rsv=4), 1002, "reserved bits set"),
    ("rsv3", frame(2, b"hi", rsv=1), 1002, "reserved bits set"),
    ("opcode 3", frame(3, b""), 1002, "reserved opcode 0x3"),
    ("opcode 0xB", frame(0xB, b""), 1002, "reserved opcode 0xb"),
    ("fragmented ping", frame(9, b"", fin=False), 1002, "fragmented control frame"),
    ("long ping", frame(9, b"p" * 126), 1002, "control frame longer than 125 bytes"),
    ("lone continuation", frame(0, b"x"), 1002, "continuation frame with no message"),
    ("data inside fragments", frame(1, b"a", fin=False) + frame(1, b"b"), 1002,
     "new data frame inside a fragmented message"),
    ("top bit length", bytes([0x82, 0xFF]) + b"\x80" + bytes(7) + b"abcd", 1002,
     "frame length has its top bit set"),
    ("bad UTF-8", frame(1, b"ok \xff"), 1007, "invalid UTF-8 in a text message"),
    ("surrogate", frame(1, b"\xed\xa0\x80"), 1007, "invalid UTF-8 in a text message"),
    ("UTF-8 cut at the end", frame(1, b"a", fin=False) + frame(0, b"\xc3"), 1007,
     "invalid UTF-8 in a text message"),
    ("bad UTF-8 across fragments", frame(1, b"\xe2\x82", fin=False) + frame(0, b"\x41"),
     1007, "invalid UTF-8 in a text message"),
    ("too big announced", frame(2, b"", length=1024 * 1024 + 1)[:14], 1009,
     "message too big: 1048577 bytes"),
    ("too big in fragments", frame(2, b"x" * 700000, fin=False) + frame(0, b"", length=400000),
     1009, "message too big: 1100000 bytes"),
    ("1-byte close", frame(8, b"\x03"), 1002, "close frame with a 1-byte payload"),
    ("close code 1005", frame(8, close_payload(1005)), 1002, "invalid close code 1005"),
    ("close code 999", frame(8, close_payload(999)), 1002, "invalid close code 999"),
    ("close code 2000", frame(8, close_payload(2000)), 1002, "invalid close code 2000"),
    ("close reason not UTF-8", frame(8, close_payload(1000, b"\xff")), 1007,
     "invalid UTF-8 in a close reason"),
]


@pytest.mark.parametrize("data,code,why", [p[1:] for p in PROTOCOL_ERRORS],
                         ids=[p[0] for p in PROTOCOL_ERRORS])
def test_protocol_error_gets_its_close_code_and_the_server_goes_on(
        ws_server, recorder, caplog_iocpnet, stack, data, code, why):
    srv = ws_server(echo_class(recorder))
    good = stack.enter_context(ws_connect(srv.url))
    bad = RawClient(srv.address)
    assert bad.status == 101
    bad.send(frame(1, b"before"))
    assert bad.read_frame() == (True, 1, b"before")
    try:
        bad.send(data)
    except (BrokenPipeError, ConnectionResetError):
        pass
    got_code, got_reason = bad.read_close()
    assert got_code == code
    assert why.split(":")[0] in got_reason
    assert bad.at_eof()
    bad.close()
    recorder.wait_disconnects(1)
    reason = recorder.disconnected[0][1]
    assert reason.startswith(f"WebSocket error {code}: ") and why in reason, reason
    assert any(why in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog_iocpnet.records)
    good.send("still here")
    assert good.recv() == "still here"


def test_control_frames_between_fragments(ws_server):
    srv = ws_server(echo_class())
    c = RawClient(srv.address)
    c.send(frame(1, b"frag", fin=False) + frame(9, b"ping1") + frame(0, b"men", fin=False)
           + frame(10, b"unsolicited pong") + frame(9, b"") + frame(0, b"ted"))
    assert c.read_frame() == (True, 10, b"ping1")
    assert c.read_frame() == (True, 10, b"")
    assert c.read_frame() == (True, 1, b"fragmented")
    # One byte at a time: every header and payload split at every point.
    data = frame(2, bytes(range(200)), fin=False) + frame(9, b"x") + frame(0, b"!" * 300)
    for i in range(len(data)):
        c.send(data[i:i + 1])
    assert c.read_frame() == (True, 10, b"x")
    assert c.read_frame() == (True, 2, bytes(range(200)) + b"!" * 300)
    c.send(frame(8, close_payload(1000, b"bye")))
    assert c.read_close() == (1000, "")
    assert c.at_eof()
    c.close()


def test_max_message_size_is_the_classes(ws_server, recorder):
    srv = ws_server(echo_class(recorder, max_message_size=100))
    c = RawClient(srv.address)
    c.send(frame(2, b"x" * 100))
    assert c.read_frame() == (True, 2, b"x" * 100)
    c.send(frame(2, b"y" * 60, fin=False))
    c.send(frame(0, b"y" * 41)[:6])              # the header alone is enough
    assert c.read_close()[0] == 1009
    c.close()
    recorder.wait_disconnects(1)
    assert "max_message_size is 100" in recorder.disconnected[0][1]


def test_keepalive_pings_and_ends_a_silent_peer(ws_server, recorder):
    srv = ws_server(echo_class(recorder, ping_interval=0.2, ping_timeout=0.3))
    with ws_connect(srv.url) as ws:              # answers pings: stays
        silent = RawClient(srv.address)          # never answers
        time.sleep(1.5)                          # pings both ways: the answering one stays
        ws.send("alive")
        assert ws.recv() == "alive"
        recorder.wait_disconnects(1)
        assert recorder.disconnected[0][1] == \
            "WebSocket keepalive: no answer to a ping for 0.3 s"
        fin, op, payload = silent.read_frame()
        assert op == 9 and len(payload) == 8
        assert silent.read_close() == (1011, "keepalive ping timeout")
        silent.close()


def test_a_flood_of_silent_upgraded_peers_is_logged_once_per_burst(ws_server, recorder,
                                                                  caplog_iocpnet):
    # Peers that complete the upgrade and then never answer a ping: each is ended at
    # ping_timeout, which wrote a line per connection (a peer holding many such
    # connections made as many lines at once).  Each still ends with its reason; the
    # log has a burst's first lines and a count.
    srv = ws_server(echo_class(recorder, ping_interval=0.1, ping_timeout=0.2))
    _flood_of_cut_peers(srv, recorder, caplog_iocpnet, RawClient,     # never answers
                        "WebSocket keepalive: no answer to a ping for 0.2 s",
                        "WebSocket keepalive timeouts",
                        r"disconnecting .*: WebSocket keepalive: ")


def test_hook_exception_closes_only_that_session(ws_server, caplog_iocpnet):
    class S(iocpnet.WebSocketSession):
        def OnMessage(self, data, binary):
            if data == "boom":
                raise RuntimeError("boom")
            self.SendMessage(data)

    srv = ws_server(S)
    with ws_connect(srv.url) as a, ws_connect(srv.url) as b:
        a.send("boom")
        with pytest.raises(ConnectionClosed):
            a.recv(timeout=5)
        b.send("fine")
        assert b.recv() == "fine"
    assert any("OnMessage" in r.getMessage() for r in caplog_iocpnet.records)


def test_send_from_other_threads_keeps_each_message_whole(ws_server):
    sessions = []

    class S(iocpnet.WebSocketSession):
        def OnConnected(self):
            sessions.append(self)

    srv = ws_server(S)
    with ws_connect(srv.url, max_size=None) as ws:
        wait_for(lambda: sessions)
        s = sessions[0]

        def blast(tag):
            for i in range(300):
                assert s.SendMessage(f"{tag}:{i}:" + tag * (i % 50))
                assert s.Send(bytes([ord(tag)]) * (i % 700))

        threads = [threading.Thread(target=blast, args=(t,)) for t in "abc"]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        last = {}
        got_bin = 0
        for _ in range(1800):
            m = ws.recv(timeout=10)
            if isinstance(m, str):
                tag, i, pad = m.split(":")
                assert pad == tag * (int(i) % 50)
                assert int(i) == last.get(tag, -1) + 1
                last[tag] = int(i)
            else:
                assert len(set(m)) <= 1
                got_bin += 1
        assert last == {"a": 299, "b": 299, "c": 299} and got_bin == 900
    sessions.clear()


def test_no_data_frame_follows_the_close_frame(ws_server):
    """RFC 6455 5.5.1: after a Close frame, no data frame.  Threads send while another
    closes; whatever SendMessage accepted arrives before the close frame, and nothing
    after it (the check "closing?" and the queueing of a frame were two steps: a send
    that passed the check could queue its frame behind the close frame)."""
    import queue
    sessions = queue.Queue()

    class S(iocpnet.WebSocketSession):
        ping_interval = 0

        def OnConnected(self):
            sessions.put(self)

    srv = ws_server(S, workers=2)
    for _ in range(30):
        accepted, frames, close, trailing = ws_raw.close_race(
            srv.address, lambda: sessions.get(timeout=10))
        assert close == (1000, "race")
        assert trailing == b"", f"{len(trailing)} bytes after the close frame"
        assert frames == accepted


# ---- our client ---------------------------------------------------------------------------

class _AsyncWsServer:
    """A `websockets` (asyncio) echo server in a thread: the peer for our client."""

    def __init__(self, handler=None, **kw):
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.handler = handler or self._echo
        self.kw = kw
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    @staticmethod
    async def _echo(ws):
        async for m in ws:
            await ws.send(m)

    def _run(self):
        from websockets.asyncio.server import serve

        async def main():
            self.stop_event = asyncio.Event()
            async with serve(self.handler, "127.0.0.1", 0, **self.kw) as server:
                self.port = server.sockets[0].getsockname()[1]
                self.ready.set()
                await self.stop_event.wait()

        self.loop.run_until_complete(main())

    def stop(self):
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(10)
        self.loop.close()


def test_our_client_against_a_websockets_server(backend):
    peer = _AsyncWsServer(max_size=None, subprotocols=["b", "a"])
    got = []
    done = threading.Event()
    big = os.urandom(300000)

    class Client(iocpnet.WebSocketSession):
        subprotocols = ("a",)
        ping_interval = 0

        def OnConnected(self):
            got.append(("proto", self.subprotocol))
            self.SendMessage("hello ✓")
            self.SendMessage(b"\x00\x01")
            self.SendMessage(big)
            self.SendMessage("")

        def OnMessage(self, data, binary):
            got.append((binary, data))
            if len(got) == 5:
                self.Close(1000, "thanks")

        def OnDisconnected(self, reason):
            got.append(("end", reason))
            done.set()

    core = iocpnet.IocpCore(backend)
    try:
        svc = iocpnet.ClientService(core, f"ws://127.0.0.1:{peer.port}/echo?a=1", Client, 1)
        svc.Start()
        deadline = time.monotonic() + 15
        while not done.is_set() and time.monotonic() < deadline:
            core.Dispatch(50)
        assert got == [("proto", "a"), (False, "hello ✓"), (True, b"\x00\x01"), (True, big),
                       (False, ""), ("end", "WebSocket closed (1000 thanks)")]
        svc.Stop(5)
    finally:
        core.Close(5)
        peer.stop()


def test_our_client_sees_a_refused_handshake(backend):
    async def refuse(conn, request):
        return conn.respond(403, "go away\n")

    peer = _AsyncWsServer(process_request=refuse)
    events = []
    done = threading.Event()

    class Client(iocpnet.WebSocketSession):
        def OnConnected(self):
            events.append("connected")

        def OnConnectFailed(self, reason):
            events.append(("failed", reason))

        def OnDisconnected(self, reason):
            events.append(("end", reason))
            done.set()

    core = iocpnet.IocpCore(backend)
    try:
        svc = iocpnet.ClientService(core, f"ws://127.0.0.1:{peer.port}/", Client, 1)
        svc.Start()
        deadline = time.monotonic() + 10
        while not done.is_set() and time.monotonic() < deadline:
            core.Dispatch(50)
        why = "WebSocket handshake refused: HTTP 403 Forbidden"
        assert events == [("failed", why), ("end", why)]
        assert svc.connect_failures == 0 or svc.connect_failures == 1
        svc.Stop(5)
    finally:
        core.Close(5)
        peer.stop()


def test_our_client_masks_and_a_server_checks_it(ws_server):
    """Our client against our server: masking on one side, required on the other."""
    srv = ws_server(echo_class())
    got = []

    class Client(iocpnet.WebSocketSession):
        def OnConnected(self):
            self.n = 0
            for i in range(50):
                self.SendMessage(bytes([i]) * (i * 997))

        def OnMessage(self, data, binary):
            got.append(data)
            self.n += 1
            if self.n == 50:
                self.Close()

    svc = iocpnet.ClientService(srv.core, srv.url + "/", Client, 3)
    svc.Start()
    wait_for(lambda: len(got) == 150 and svc.session_count == 0, timeout=20)
    for i in range(50):
        assert got.count(bytes([i]) * (i * 997)) == 3
    svc.Stop(5)


@pytest.mark.parametrize("url,kw,error", [("http://x/", {}, "not a ws:// or wss:// URL"),
                                          ("ws://x/", {"ssl": True}, "use a wss:// URL"),
                                          ("ws:///p", {}, "no host")])
def test_client_url_errors(url, kw, error):
    import ssl
    if kw:
        kw = {"ssl": ssl.create_default_context()}
    core = iocpnet.IocpCore()
    try:
        with pytest.raises(ValueError, match=error):
            iocpnet.ClientService(core, url, iocpnet.WebSocketSession, **kw)
    finally:
        core.Close()


# ---- packets over WebSocket ------------------------------------------------------------------

class Room:
    def __init__(self):
        self.lock = threading.Lock()
        self.members = []


def test_packets_over_websocket_share_a_room_with_native_clients(backend, stack):
    room = Room()

    class RoomSession(iocpnet.PacketSession):
        def OnConnected(self):
            with room.lock:
                room.members.append(self)
            self.SendPacket(1, b"welcome")

        def OnRecvPacket(self, packet_id, payload):
            with room.lock:
                self.service.Broadcast(iocpnet.make_packet(packet_id, payload),
                                       sessions=list(room.members))

        def OnDisconnected(self, reason):
            with room.lock:
                if self in room.members:
                    room.members.remove(self)

    core = iocpnet.IocpCore(backend)
    native = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), RoomSession, 8)
    web = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0), websocket=True),
                          RoomSession, 8)
    native.Start()
    web.Start()
    threads = [threading.Thread(target=lambda: [0 for _ in iter(lambda: core.Dispatch() >= 0,
                                                                 False)], daemon=True)
               for _ in range(2)]
    for t in threads:
        t.start()
    try:
        tcp = connect(("127.0.0.1", native.listener.port))
        assert _read_packets(tcp, 1) == [(1, b"welcome")]
        ws = stack.enter_context(ws_connect(f"ws://127.0.0.1:{web.listener.port}/"))
        assert ws.recv() == ref.encode(1, b"welcome")
        wait_for(lambda: len(room.members) == 2)
        # Two packets in one message from the browser side; one from the native side.
        ws.send(ref.encode(7, b"from web") + ref.encode(8, b""))
        tcp.sendall(ref.encode(9, b"from tcp"))
        want = {(7, b"from web"), (8, b""), (9, b"from tcp")}
        assert set(_read_packets(tcp, 3)) == want
        assert {_one_packet(ws.recv(timeout=5)) for _ in range(3)} == want
        # A text message and a message ending inside a packet are refused.
        with ws_connect(f"ws://127.0.0.1:{web.listener.port}/") as bad:
            bad.recv()
            bad.send("text")
            with pytest.raises(ConnectionClosed) as ei:
                bad.recv(timeout=5)
            assert ei.value.rcvd.code == 1003
        with ws_connect(f"ws://127.0.0.1:{web.listener.port}/") as bad:
            bad.recv()
            bad.send(ref.encode(5, b"whole") + ref.encode(6, b"cut")[:5])
            assert _one_packet(bad.recv(timeout=5)) == (5, b"whole")
            with pytest.raises(ConnectionClosed) as ei:
                while True:
                    bad.recv(timeout=5)
            assert ei.value.rcvd.code == 1008
        ws.close()
        tcp.close()
    finally:
        native.Stop(5)
        web.Stop(5)
        core.Close(5)
        for t in threads:
            t.join(5)


def test_packet_client_over_websocket(ws_server):
    """A PacketSession bot through ClientService("ws://..."): SendPacket and
    OnRecvPacket unchanged."""
    class Server(iocpnet.PacketSession):
        def OnRecvPacket(self, packet_id, payload):
            self.SendPacket(packet_id + 1, payload[::-1])

    srv = ws_server(Server, websocket_listener=True)
    got = []

    class Bot(iocpnet.PacketSession):
        def OnConnected(self):
            for i in range(20):
                self.SendPacket(i, bytes(range(i)))

        def OnRecvPacket(self, packet_id, payload):
            got.append((packet_id, payload))
            if len(got) == 20:
                self.Disconnect("done")

    svc = iocpnet.ClientService(srv.core, srv.url + "/", Bot, 1)
    svc.Start()
    wait_for(lambda: len(got) == 20 and svc.session_count == 0)
    assert got == [(i + 1, bytes(range(i))[::-1]) for i in range(20)]
    svc.Stop(5)


def _read_packets(sock, n):
    out = []
    for _ in range(n):
        h = recv_exactly(sock, 4)
        size = h[0] | h[1] << 8
        out.append((h[2] | h[3] << 8, recv_exactly(sock, size - 4)))
    return out


def _one_packet(message):
    packets, used, err = iocpnet.scan_packets(message)
    assert err is None and used == len(message) and len(packets) == 1
    return packets[0]


def test_flood_limits_count_websocket_messages(ws_server, recorder, caplog_iocpnet):
    """recv_messages_per_second counts WebSocket messages (and pings), not receives:
    a flooder is cut, a client within the rate is served, and stats() counts each
    message once."""
    srv = ws_server(echo_class(recorder, recv_messages_per_second=20,
                               recv_messages_burst=40))
    with ws_connect(srv.url) as good:
        for i in range(30):                       # within the burst
            good.send(f"ok {i}")
            assert good.recv() == f"ok {i}"
        flooder = RawClient(srv.address)
        flooder.send(b"".join(frame(2, b"x" * 10) for _ in range(300)))
        recorder.wait_disconnects(1)
        assert recorder.disconnected[0][1].startswith("rate limit: "), recorder.disconnected
        assert "recv_messages_per_second 20" in recorder.disconnected[0][1]
        flooder.close()
        good.send("still served")
        assert good.recv() == "still served"
    recorder.wait_disconnects(2)
    stats = srv.service.stats()
    # 31 messages from the good client, up to the burst (40) from the flooder.
    assert 31 + 40 <= stats["messages_in"] <= 31 + 42, stats


@pytest.mark.parametrize("opcode", [1, 2])
@pytest.mark.parametrize("cut", [0.1, 0.5, 0.7, 0.999])
def test_one_frame_message_over_two_receives(ws_server, opcode, cut):
    """A one-frame message cut in two (more or less than half in the first receive:
    straight into its bytes object, or the growing buffer): delivered whole."""
    srv = ws_server(echo_class())
    c = RawClient(srv.address)
    payload = ("é" * 9000).encode() if opcode == 1 else os.urandom(20000)
    data = frame(opcode, payload)
    k = int(len(data) * cut)
    c.send(data[:k])
    time.sleep(0.02)
    c.send(data[k:] + frame(opcode, payload[:10] if opcode == 2 else b"tail"))
    assert c.read_frame() == (True, opcode, payload)
    assert c.read_frame() == (True, opcode, payload[:10] if opcode == 2 else b"tail")
    c.close()


def test_our_client_gives_up_on_an_endless_response_head(backend):
    """A server whose response head never ends: our client fails the connection at
    max_header_size (OnConnectFailed, then OnDisconnected).  It answered the server
    with an HTTP 431 response instead, as if it were the server, and OnConnectFailed
    never ran."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    heard = []

    def serve():
        c, _ = lsock.accept()
        c.settimeout(10)
        req = b""
        while b"\r\n\r\n" not in req:
            req += c.recv(4096)
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nX-Junk: " + b"a" * 9000)
        data = b""
        try:
            while True:
                d = c.recv(4096)
                if not d:
                    break
                data += d
        except OSError:
            pass
        heard.append(data)
        c.close()

    th = threading.Thread(target=serve)
    th.start()
    events = []
    done = threading.Event()

    class Client(iocpnet.WebSocketSession):
        ping_interval = 0

        def OnConnectFailed(self, reason):
            events.append(("failed", reason))

        def OnDisconnected(self, reason):
            events.append(("end", reason))
            done.set()

    core = iocpnet.IocpCore(backend)
    try:
        svc = iocpnet.ClientService(core, f"ws://127.0.0.1:{lsock.getsockname()[1]}/",
                                    Client, 1)
        svc.Start()
        deadline = time.monotonic() + 10
        while not done.is_set() and time.monotonic() < deadline:
            core.Dispatch(50)
        svc.Stop(5)
    finally:
        core.Close(5)
        th.join(10)
        lsock.close()
    why = ("WebSocket handshake failed: response head larger than max_header_size "
           "(8192 bytes)")
    assert events == [("failed", why), ("end", why)]
    assert heard == [b""]          # nothing but our request was sent


@pytest.mark.parametrize("setting", [{"origin": "http://a.example\r\nX-Injected: 1"},
                                     {"subprotocols": ("chat\r\nX-Injected: 1",)},
                                     {"subprotocols": ("a b",)},
                                     {"origin": "http://例え.example"}])
def test_our_client_refuses_a_header_injection_in_its_settings(backend, setting):
    """A client's origin and subprotocols are written into its upgrade request: a CR LF
    in one added headers of its own (X-Injected reached the server).  Refused with a
    ValueError when the client is made, before anything is sent."""
    seen = []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    Client = type("Client", (iocpnet.WebSocketSession,), dict(setting))
    core = iocpnet.IocpCore(backend)
    try:
        svc = iocpnet.ClientService(core, f"ws://127.0.0.1:{listener.getsockname()[1]}/",
                                    Client, 0)
        svc.Start(workers=1)
        with pytest.raises(ValueError, match="origin|subprotocol"):
            svc.Connect()
        with contextlib.suppress(socket.timeout):
            c, _ = listener.accept()
            c.settimeout(0.5)
            with contextlib.suppress(OSError), c:
                seen.append(c.recv(4096))
        assert not any(b"X-Injected" in x for x in seen), seen
    finally:
        core.Close()
        listener.close()


def test_our_client_percent_encodes_a_url_path_that_is_not_ascii(ws_server):
    """A ws:// URL's path and query went into the request line as given: a space split
    it (our server answered 400, "not an HTTP/1.1 request"), a character past Latin-1
    failed the handshake with a UnicodeEncodeError.  They are percent-encoded as UTF-8,
    as a browser does; what is encoded already stays so."""
    paths = []

    class S(iocpnet.WebSocketSession):
        def OnUpgrade(self, request):
            paths.append((request.path, request.host))
            return None

    srv = ws_server(S, workers=1)
    events = []
    connected = threading.Event()

    class Client(iocpnet.WebSocketSession):
        def OnConnected(self):
            events.append("connected")
            connected.set()

        def OnConnectFailed(self, reason):
            events.append(reason)
            connected.set()

    svc = iocpnet.ClientService(srv.core, srv.url + "/a b/ünï/例?q=x y&r=%41#frag",
                                Client, 1)
    svc.Start()
    try:
        assert connected.wait(10)
        assert events == ["connected"]
        assert paths == [("/a%20b/%C3%BCn%C3%AF/%E4%BE%8B?q=x%20y&r=%41",
                          f"127.0.0.1:{srv.listener.port}")]
    finally:
        svc.Stop(5)
    # The Host header of a name that is not ASCII is its IDNA form (what was resolved).
    _, (host, path), _ = iocpnet._core._ws_parse_url("ws://bücher.example:81/")
    assert (host, path) == ("xn--bcher-kva.example:81", "/")


def test_an_http_response_header_with_a_line_break_is_refused(ws_server):
    """OnUpgrade redirecting to a URL it decoded from the request (?next=...%0D%0A...):
    a CR LF in a header value went onto the wire, a header of the peer's choosing in
    our answer (response splitting: here a Set-Cookie).  HttpResponse refuses a
    control character in a value or the content type, and a name that is not a token
    (ValueError): the hook raised, so the client gets a 500."""
    from urllib.parse import unquote

    class S(iocpnet.WebSocketSession):
        def OnUpgrade(self, request):
            _, _, target = request.path.partition("?next=")
            return iocpnet.HttpResponse(302, headers={"Location": unquote(target)})

    srv = ws_server(S)
    s = connect(srv.address)
    s.sendall(b"GET /login?next=/home%0D%0ASet-Cookie:%20session=evil HTTP/1.1\r\n"
              b"Host: x\r\n\r\n")
    status, headers, _ = ws_raw.read_head(s)
    s.close()
    assert status == 500 and "set-cookie" not in headers, (status, headers)
    for bad in ({"X": "a\nb"}, {"X": "a\rb"}, {"X\r\nY": "1"}, {"Bad Name": "1"},
                {"": "1"}):
        with pytest.raises(ValueError):
            iocpnet.HttpResponse(200, headers=bad)
    with pytest.raises(ValueError):
        iocpnet.HttpResponse(200, content_type="text/html\r\nX-Injected: 1")
    ok = iocpnet.HttpResponse(200, headers={"X-Tab": "a\tb", "Cache-Control": "no-store"})
    assert b"X-Tab: a\tb\r\n" in ok._encode()



def test_a_connection_refused_for_a_bad_websocket_class_frees_its_place(
        backend, caplog_iocpnet):
    """A websocket Listener refuses (logged) a connection whose session class has bad
    WebSocket settings.  Such a refusal must not keep a place under max_sessions: each
    one kept a place, so after max_sessions of them every later connection was refused
    as 'max_sessions', whatever its class (a factory that makes several classes)."""
    failure = _bad_websocket_class_refusals(backend)
    assert failure is None, failure
    refusals = [r for r in caplog_iocpnet.records
                if "cannot make" in r.getMessage() and "WebSocket" in r.getMessage()]
    assert len(refusals) == 3


def test_a_plain_session_with_onmessage_is_warned_once(ws_server, caplog_iocpnet):
    """A plain Session (not a WebSocketSession) that defines OnMessage, on a websocket
    Listener: its messages go to OnRecv, which it lacks, so they are dropped; the
    OnMessage written for them is never called.  That was silent: one warning per class
    now says so (it still connects: the class may serve TCP listeners too)."""
    got = []

    class Chat(iocpnet.Session):
        def OnMessage(self, data, binary):
            got.append(bytes(data))

    srv = ws_server(Chat, websocket_listener=True)
    for _ in range(2):
        c = RawClient(srv.address)
        assert c.status == 101
        c.send(frame(2, b"hello"))
        c.close()
    wait_for(lambda: srv.service.total_sessions == 2 and srv.service.session_count == 0,
             message="both sessions ended")
    warned = [r.getMessage() for r in caplog_iocpnet.records
              if "defines OnMessage but is not a WebSocketSession" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("Chat "), warned
    assert got == []


def _bad_websocket_class_refusals(backend):
    """The test's body: why it failed, or None (a traceback through these frames would
    keep the core alive past the test)."""
    class Bad(iocpnet.Session):
        max_message_size = 0

    class Good(iocpnet.Session):
        def OnRecv(self, data):
            self.Send(data)

    made = []

    def factory():            # the first three sessions are Bad, the rest Good
        made.append(1)
        return Bad() if len(made) <= 3 else Good()

    core = iocpnet.IocpCore(backend)
    listener = iocpnet.Listener(("127.0.0.1", 0), websocket=True)
    service = iocpnet.Service(core, listener, factory, 1, max_sessions=2)
    service.Start()
    workers = [threading.Thread(target=lambda: [None for _ in iter(
        lambda: core.Dispatch() >= 0, False)]) for _ in range(2)]
    for t in workers:
        t.start()
    try:
        for i in range(3):
            try:           # refused with a reset, maybe before connect() returned
                with connect(listener.address, timeout=5) as c:
                    got = c.recv(16)
            except ConnectionResetError:
                got = b""
            if got != b"":
                return f"refused connection {i} got {got!r}"
        try:
            with ws_connect(f"ws://127.0.0.1:{listener.port}", open_timeout=5) as ws:
                ws.send(b"still served")
                got = ws.recv(timeout=5)
        except Exception as e:
            got = repr(e)
        if got != b"still served":
            return (f"a good session after three refusals: {got}; refused "
                    f"{service.stats()['refused']}")
        return None
    finally:
        service.Stop(5)
        core.Close(5)
        for t in workers:
            t.join(10)
