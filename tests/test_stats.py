"""service.stats() on every backend: figures that match what the test did (exact where
they can be), disconnects put in their buckets, hook times for a measure_hooks class,
and the Prometheus exposition scraped over HTTP with a plain client and parsed."""
import os
import socket
import struct
import threading
import time
import urllib.error
import urllib.request

import pytest

import iocpnet

from conftest import connect, recv_exactly, recv_until_eof, wait_for

if os.environ.get("CI"):
    import prometheus_client  # noqa: F401  (the test extra must bring it: never skip in CI)


def packet(pid, payload):
    return struct.pack("<HH", len(payload) + 4, pid) + payload


class Echo(iocpnet.PacketSession):
    measure_hooks = True

    def OnConnected(self):
        pass

    def OnRecvPacket(self, packet_id, payload):
        self.SendPacket(packet_id, payload)

    def OnDisconnected(self, reason):
        pass


CLIENTS, PACKETS, PAYLOAD = 5, 20, 100


def run_echo_clients(address):
    for c in range(CLIENTS):
        with connect(address) as s:
            for k in range(PACKETS):
                p = packet(k, bytes([c]) * PAYLOAD)
                s.sendall(p)
                assert recv_exactly(s, len(p)) == p


def test_figures_match_what_the_clients_did(server):
    srv = server(Echo, accepts=8)
    run_echo_clients(srv.address)
    wait_for(lambda: srv.service.session_count == 0, 10, "every session to end")
    st = srv.service.stats()
    size = PAYLOAD + 4
    assert st["backend"] == srv.core.backend
    assert st["sessions"] == {"live": 0, "total": CLIENTS}
    assert st["accepts"] == CLIENTS and st["accept_errors"] == 0
    assert st["factory_failures"] == st["send_timeouts"] == st["idle_disconnects"] == 0
    assert st["bytes_in"] == st["bytes_out"] == CLIENTS * PACKETS * size
    assert st["messages_in"] == st["messages_out"] == CLIENTS * PACKETS
    assert st["send_queue_bytes"] == st["send_queue_bytes_max"] == 0
    assert st["refused"] == dict.fromkeys(
        ["max_sessions", "max_sessions_per_address", "connect_rate_per_address",
         "shutdown", "bad_session_class"], 0)
    assert st["disconnects"]["peer_closed"] == CLIENTS
    assert sum(st["disconnects"].values()) == CLIENTS
    hooks = st["hooks"]
    assert hooks["OnRecvPacket"]["count"] == CLIENTS * PACKETS
    assert hooks["OnConnected"]["count"] == hooks["OnDisconnected"]["count"] == CLIENTS
    for h in hooks.values():
        assert 0 < h["seconds_max"] <= h["seconds"]
    d = st["dispatch"]
    assert sum(d["batch_sizes"].values()) == d["batches"] > 0
    assert d["completions"] >= CLIENTS * PACKETS         # a receive each (replies may
                                                         # leave with no completion)
    assert 1 <= d["batch_max"] <= 128
    assert 0 < d["seconds_max"] <= d["seconds"]


def test_hooks_are_not_measured_unless_asked(server):
    class Plain(iocpnet.PacketSession):
        def OnRecvPacket(self, packet_id, payload):
            self.SendPacket(packet_id, payload)

    srv = server(Plain)
    with connect(srv.address) as s:
        s.sendall(packet(1, b"x"))
        recv_exactly(s, 5)
    assert srv.service.stats()["hooks"] == {}
    assert srv.service.stats()["messages_in"] == 1


def test_measured_on_recv_still_recycles_its_view(server):
    """measure_hooks wraps OnRecv; the memoryview it passes through is still given back
    (no_leaks counts kept views) and every call is counted."""

    class Timed(iocpnet.Session):
        measure_hooks = True

        def OnRecv(self, data):
            self.Send(data)

    srv = server(Timed)
    with connect(srv.address) as s:
        for k in range(50):
            msg = b"m%03d" % k
            s.sendall(msg)
            assert recv_exactly(s, 4) == msg
    wait_for(lambda: srv.service.session_count == 0, 10, "the session to end")
    st = srv.service.stats()
    assert st["hooks"]["OnRecv"]["count"] == st["messages_in"] == 50
    assert list(st["hooks"]) == ["OnRecv"]


def test_send_queue_figures(server):
    """A client that does not read: what the server queued and the kernel did not take
    shows as send-queue bytes, all of it in one session (the largest); read, it is 0."""
    big = b"q" * (24 << 20)          # more than the kernel buffers (4 MiB + the peer's)

    class Pusher(iocpnet.Session):
        send_queue_limit = 64 << 20

        def OnConnected(self):
            self.Send(big)

    srv = server(Pusher)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.connect(srv.address)
        wait_for(lambda: srv.service.stats()["messages_out"] == 1, 10, "the Send")
        time.sleep(0.2)
        st = srv.service.stats()
        assert 16 << 20 < st["send_queue_bytes"] == st["send_queue_bytes_max"] <= len(big)
        assert recv_exactly(s, len(big)) == big
        wait_for(lambda: srv.service.stats()["send_queue_bytes"] == 0, 10, "the queue to drain")
        assert srv.service.stats()["bytes_out"] == len(big)


def test_disconnects_are_bucketed(server):
    """One session ended each way lands in its bucket; nothing else is counted."""

    class Kinds(iocpnet.Session):
        recv_buffer_limit = 1024

        def OnRecv(self, data):
            cmd = bytes(data[:1])
            if cmd == b"d":
                self.Disconnect("the application says bye")
            elif cmd == b"e":
                raise RuntimeError("boom")
            elif cmd == b"l":
                return 0                 # keep everything: the receive buffer fills
            return None

    srv = server(Kinds)
    expect = {"closed": 1, "hook_error": 1, "limit": 1, "reset": 1, "peer_closed": 1,
              "shutdown": 1}
    with connect(srv.address) as s:
        s.sendall(b"d")
        assert s.recv(10) == b""
    with connect(srv.address) as s:
        s.sendall(b"e")
        assert s.recv(10) == b""
    with connect(srv.address) as s:
        try:
            s.sendall(b"l" * 4096)
            s.recv(10)
        except ConnectionResetError:
            pass
    # Each step waits until the server has accepted the connection (total_sessions), not
    # only for the live count: a connection the client made is not yet a session, and
    # the count of the one before it may still be seen instead (with two workers running
    # in parallel on 3.13t, the last one was sometimes not accepted yet when Stop closed
    # the listener, and no session ended by the shutdown).
    def settled(total, live):
        return srv.service.total_sessions == total and srv.service.session_count == live

    wait_for(lambda: settled(3, 0), 10, "the first three sessions to end")
    s = connect(srv.address)
    wait_for(lambda: settled(4, 1), 10, "the session")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()                            # a reset
    with connect(srv.address):
        pass                             # peer closed
    wait_for(lambda: settled(5, 0), 10, "every session to end")
    shut = connect(srv.address)
    wait_for(lambda: settled(6, 1), 10, "the last session")
    srv.service.Stop()
    shut.close()
    st = srv.service.stats()
    assert {k: v for k, v in st["disconnects"].items() if v} == expect


@pytest.mark.parametrize("reason, bucket", [
    ("peer closed the connection", "peer_closed"),
    ("peer closed the connection (3 bytes of an unfinished message left)", "peer_closed"),
    ("connection reset by peer", "reset"),
    ("broken pipe", "reset"),
    ("connection timed out", "timeout"),
    ("idle timeout: nothing received for 30 s", "timeout"),
    ("peer closed the connection (its queued data was not flushed in time)", "timeout"),
    ("send queue limit exceeded: 5 bytes queued, send_queue_limit is 4", "limit"),
    ("send stalled: 270336 bytes queued, nothing sent for 10 s (the peer is not reading)",
     "timeout"),
    ("receive buffer full: 9 bytes received", "limit"),
    ("rate limit: 12 messages/s over recv_messages_per_second 10", "limit"),
    ("bad packet: size 2 is smaller than the 4-byte header (packet id 77)", "protocol"),
    ("unknown packet id 9", "protocol"),
    ("exception in OnRecv: ValueError", "hook_error"),
    ("cannot send: bad socket", "error"),
    ("server shutdown", "shutdown"),
    ("WebSocket closed by the peer (1000)", "peer_closed"),
    ("WebSocket closed (1000)", "closed"),
    ("WebSocket closed (1001); the peer did not answer within 5 s", "timeout"),
    ("WebSocket keepalive: no answer to a ping for 20 s", "timeout"),
    ("WebSocket error 1009: message too big: 2000000 bytes, max_message_size is 1048576",
     "limit"),
    ("WebSocket error 1002: reserved opcode 0x3", "protocol"),
    ("WebSocket upgrade refused: 400 Bad Request", "protocol"),
    ("TLS handshake failed: not completed within 10 s", "timeout"),
    ("TLS handshake failed: [SSL: WRONG_VERSION_NUMBER] wrong version number", "protocol"),
    ("anything the application said", "closed"),
    ("rate limit" + "x" * 10000, "limit"),
])
def test_reason_buckets(reason, bucket):
    assert iocpnet._core._disconnect_bucket(reason) == bucket
    # A str subclass (an object's __str__ may return one to Disconnect) the same.
    assert iocpnet._core._disconnect_bucket(_Reason(reason)) == bucket


class _Reason(str):
    pass


def test_client_service_figures(server, backend):
    """A ClientService counts its own side: connects that failed, bytes both ways."""

    class Greeter(iocpnet.Session):
        def OnConnected(self):
            self.Send(b"hello")

    class Client(iocpnet.Session):
        def OnRecv(self, data):
            self.Disconnect("done")

    srv = server(Greeter)
    core = iocpnet.IocpCore(backend)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead_port = unused.getsockname()[1]
    clients = iocpnet.ClientService(core, srv.address, Client, 3)
    dead = iocpnet.ClientService(core, ("127.0.0.1", dead_port), Client, 2)
    stop = threading.Event()
    worker = threading.Thread(target=lambda: [core.Dispatch(50) for _ in iter(stop.is_set, True)])
    worker.start()
    try:
        clients.Start()
        dead.Start()
        wait_for(lambda: clients.session_count == 0 and dead.session_count == 0, 10,
                 "the clients to end")
        st = clients.stats()
        assert st["bytes_in"] == 15 and st["messages_out"] == 0
        assert st["disconnects"]["closed"] == 3 and st["accepts"] == 0
        assert st["connect_failures"] == 0
        st = dead.stats()
        assert st["disconnects"]["connect_failed"] == 2 == st["connect_failures"]
    finally:
        stop.set()
        worker.join(10)
        clients.Stop()
        dead.Stop()
        core.Close()


# ---------------------------------------------------------------------------------------
# Prometheus

def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return r.read().decode()


def samples(text):
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_prometheus_scrape(server):
    pytest.importorskip("prometheus_client")
    srv = server(Echo, accepts=8)
    metrics = srv.service.ServeMetrics(0, name="game")
    run_echo_clients(srv.address)
    wait_for(lambda: srv.service.session_count == 0, 10, "every session to end")
    # stats() first: a worker may still dispatch a batch (an accept re-armed...) after
    # the last session ended, so only a scrape taken after it is sure to count as many.
    st = srv.service.stats()
    got = samples(scrape(metrics.port))
    lab = (("backend", srv.core.backend), ("service", "game"))
    assert got[("iocpnet_sessions", lab)] == 0
    assert got[("iocpnet_sessions_started_total", lab)] == CLIENTS
    assert got[("iocpnet_accepts_total", lab)] == CLIENTS
    assert got[("iocpnet_received_bytes_total", lab)] == st["bytes_in"] == \
        CLIENTS * PACKETS * (PAYLOAD + 4)
    assert got[("iocpnet_sent_messages_total", lab)] == CLIENTS * PACKETS
    assert got[("iocpnet_disconnects_total", tuple(sorted(lab + (("reason", "peer_closed"),))))] \
        == CLIENTS
    assert got[("iocpnet_refused_connections_total",
                tuple(sorted(lab + (("reason", "max_sessions"),))))] == 0
    hook = tuple(sorted(lab + (("hook", "OnRecvPacket"),)))
    assert got[("iocpnet_hook_seconds_count", hook)] == CLIENTS * PACKETS
    assert got[("iocpnet_hook_seconds_sum", hook)] > 0
    # The batch-size histogram: cumulative buckets ending at +Inf = the batch count.
    inf = tuple(sorted(lab + (("le", "+Inf"),)))
    assert got[("iocpnet_dispatch_batch_size_bucket", inf)] == \
        got[("iocpnet_dispatch_batch_size_count", lab)] >= st["dispatch"]["batches"] > 0
    # Stop() closes the server and frees its port.
    srv.service.Stop()
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        scrape(metrics.port)


def test_serve_metrics_is_closed_by_hand_too(server):
    pytest.importorskip("prometheus_client")
    srv = server(Echo)
    with srv.service.ServeMetrics(0) as m:
        assert "iocpnet_sessions{" in scrape(m.port)
    m.Close()
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        scrape(m.port)


def test_metrics_server_drops_connections_that_send_nothing(server, capfd):
    """A peer that opens connections to the metrics port and sends nothing held a
    thread per connection for good (200 connections: 200 threads).  A request has
    request_timeout seconds to arrive; the connection is then closed, quietly, and
    scrapes beside it are answered meanwhile."""
    pytest.importorskip("prometheus_client")
    from iocpnet.metrics import MetricsServer
    srv = server(Echo)
    before = threading.active_count()
    with MetricsServer(srv.service, 0, request_timeout=0.5) as m:
        idle = [socket.create_connection(("127.0.0.1", m.port)) for _ in range(20)]
        half = socket.create_connection(("127.0.0.1", m.port))
        half.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")    # and no more
        assert "iocpnet_sessions{" in scrape(m.port)
        for c in idle + [half]:
            c.settimeout(10)
            assert c.recv(100) == b""            # closed by the server
            c.close()
        wait_for(lambda: threading.active_count() <= before + 1, 10,
                 "the metrics server's connection threads to end")
        assert "iocpnet_sessions{" in scrape(m.port)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception" not in err, err


def test_serve_metrics_after_stop_is_refused(server):
    """Stop() closes the metrics servers; one asked for after Stop() was never closed by
    anything (a listening socket and a thread for good).  It is refused instead."""
    pytest.importorskip("prometheus_client")
    srv = server(Echo)
    srv.service.Stop()
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="stopped"):
        srv.service.ServeMetrics(0)
    assert threading.active_count() == before


def test_serve_metrics_passes_the_metrics_server_limits(server):
    """ServeMetrics() takes MetricsServer's request_timeout and max_connections (it
    took neither: a service's own metrics server could not be tightened)."""
    pytest.importorskip("prometheus_client")
    srv = server(Echo)
    m = srv.service.ServeMetrics(0, request_timeout=0.5, max_connections=1)
    held = socket.create_connection(("127.0.0.1", m.port))
    try:
        wait_for(lambda: _refused_503(m.port), 10, "the second connection to be refused")
        held.settimeout(10)
        assert held.recv(100) == b""        # closed at request_timeout, not 10 s
    finally:
        held.close()
    with pytest.raises(ValueError):
        srv.service.ServeMetrics(0, max_connections=0)
    srv.service.Stop()


@pytest.mark.parametrize("bad", [{"request_timeout": 1e10},
                                 {"request_timeout": float("inf")},
                                 {"request_timeout": True},
                                 {"max_connections": True},
                                 {"max_connections": 2.0}])
def test_serve_metrics_refuses_settings_it_cannot_serve_with(server, bad):
    """A request_timeout past what a socket timeout can hold (inf, 1e10 s) was taken,
    and every scrape then failed in its handler thread (OverflowError, a traceback on
    stderr per connection, no answer); True was taken as 1 s and as 1 connection.
    Refused with a ValueError when the server is made."""
    pytest.importorskip("prometheus_client")
    srv = server(Echo)
    before = threading.active_count()
    with pytest.raises(ValueError, match="request_timeout|max_connections"):
        srv.service.ServeMetrics(0, **bad)
    assert threading.active_count() == before       # no server left serving
    m = srv.service.ServeMetrics(0, request_timeout=1e9)       # long, and it works
    with socket.create_connection(("127.0.0.1", m.port), timeout=10) as c:
        c.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert recv_exactly(c, 12) == b"HTTP/1.0 200"
    srv.service.Stop()


def _refused_503(port):
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.settimeout(5)
        c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        status = c.recv(100).split(b"\r\n")[0]
        return status.startswith(b"HTTP/1.") and b" 503 " in status


def test_metrics_server_caps_its_connections(server, capfd):
    """Each connection holds a thread for up to request_timeout: a peer opening
    thousands held thousands.  Past max_connections a connection is answered 503 and
    closed at once; the threads stay bounded and a scrape works again once the held
    ones end."""
    pytest.importorskip("prometheus_client")
    from iocpnet.metrics import MetricsServer
    srv = server(Echo)
    before = threading.active_count()
    with MetricsServer(srv.service, 0, request_timeout=5.0, max_connections=4) as m:
        held = [socket.create_connection(("127.0.0.1", m.port)) for _ in range(4)]
        wait_for(lambda: threading.active_count() >= before + 1 + 4, 10,
                 "4 connection threads")
        extra = [socket.create_connection(("127.0.0.1", m.port)) for _ in range(30)]
        for c in extra:
            c.settimeout(10)
            assert recv_until_eof(c).startswith(b"HTTP/1.0 503"), "refused at once"
            c.close()
        assert threading.active_count() <= before + 1 + 4
        for c in held:
            c.close()
        wait_for(lambda: threading.active_count() <= before + 1, 10,
                 "the held connections' threads to end")
        assert "iocpnet_sessions{" in scrape(m.port)
    with pytest.raises(ValueError):
        MetricsServer(srv.service, 0, max_connections=0)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception" not in err, err


def test_metrics_server_cuts_a_request_that_trickles_in(server, capfd):
    """request_timeout bounded each read, not the request: a peer sending a byte now
    and then held its connection (and, max_connections of them, every slot: scrapes
    refused) for as long as it liked.  The whole request has request_timeout."""
    pytest.importorskip("prometheus_client")
    from iocpnet.metrics import MetricsServer
    srv = server(Echo)
    with MetricsServer(srv.service, 0, request_timeout=1.0) as m:
        c = socket.create_connection(("127.0.0.1", m.port))
        c.sendall(b"GET /metrics HTTP/1.1\r\n")
        start = time.monotonic()
        closed = False
        while time.monotonic() - start < 5:
            try:
                c.sendall(b"X")           # a header that never ends, a byte at a time
            except OSError:
                closed = True
                break
            c.settimeout(0.05)
            try:
                if c.recv(100) == b"":
                    closed = True
                    break
            except socket.timeout:
                pass
        c.close()
        assert closed, "a trickling request kept its connection for 5 s"
        assert "iocpnet_sessions{" in scrape(m.port)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception" not in err, err


def test_tls_figures(server, tmp_path_factory):
    """Over TLS a message out is still one Send (not one record), and bytes are what
    crossed the socket: the ciphertext, handshake included, more than the plaintext."""
    tls = pytest.importorskip("test_tls")
    if tls.OPENSSL is None:
        pytest.skip("the openssl command is missing")
    pki = tls.make_pki(tmp_path_factory.mktemp("stats-pki"))

    class TlsEcho(iocpnet.Session):
        def OnRecv(self, data):
            self.Send(data)
            self.Send(b"!")

    srv = server(TlsEcho, ssl=tls.server_context(pki))
    with tls.tls_connect(srv.address, tls.client_context(pki)) as c:
        for k in range(10):
            msg = b"m%02d" % k
            c.sendall(msg)
            assert tls.recv_all(c, 4) == msg + b"!"
    wait_for(lambda: srv.service.session_count == 0, 10, "the session to end")
    st = srv.service.stats()
    assert st["messages_out"] == 20
    assert st["bytes_in"] > 10 * 3 + 200 and st["bytes_out"] > 10 * 4 + 200


def test_counts_are_exact_with_sends_from_many_threads(server):
    """8 threads Send to one session at once (truly in parallel on 3.13t), while its
    worker answers the peer: no count is lost, whatever path each Send took (straight
    to the socket, or queued behind another)."""
    THREADS, SENDS, SIZE = 8, 500, 100
    ready = threading.Event()
    holder = []

    class Target(iocpnet.Session):
        def OnConnected(self):
            holder.append(self)
            ready.set()

        def OnRecv(self, data):
            self.Send(data)

    srv = server(Target, workers=2)
    with connect(srv.address) as s:
        assert ready.wait(10)
        target = holder.pop()
        go = threading.Barrier(THREADS)

        def sender(i):
            go.wait(10)
            for _ in range(SENDS):
                target.Send(bytes([i]) * SIZE)

        threads = [threading.Thread(target=sender, args=(i,)) for i in range(THREADS)]
        for t in threads:
            t.start()
        s.sendall(b"echo")
        got = recv_exactly(s, THREADS * SENDS * SIZE + 4)
        for t in threads:
            t.join(30)
        del target
        assert sorted(got.replace(b"echo", b"", 1)) == sorted(
            b"".join(bytes([i]) * SIZE * SENDS for i in range(THREADS)))
        st = srv.service.stats()
        assert st["messages_out"] == THREADS * SENDS + 1
        assert st["bytes_out"] == THREADS * SENDS * SIZE + 4
        assert st["messages_in"] >= 1 and st["bytes_in"] == 4
