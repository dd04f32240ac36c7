"""Peers that go away at the worst moment (attack round, session 9): what the user reads
in OnDisconnected and the log must name what failed, and the server goes on."""
import gc
import logging
import socket
import struct
import sysconfig
import threading
import weakref

import pytest

import iocpnet
from conftest import Server, connect, assert_logged_per_burst, logged_per_burst, wait_for
from subproc import Proc
from test_tls import (Events, assert_good_client_works, client_context, client_hello,
                      echo_session, pki, server_context, tls_connect)
from tls_certs import OPENSSL

__all__ = ["pki"]       # the session-scoped fixture, shared with test_tls


def reset(sock):
    """Close with an RST (SO_LINGER 0), not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.skipif(OPENSSL is None, reason="the openssl command is missing")
def test_a_handshake_cut_while_the_server_answers_says_the_handshake_failed(backend, pki):
    # The client sends a whole ClientHello and resets before anyone dispatches: the
    # server reads the hello, and its ServerHello goes to a peer already gone, so the
    # failure is the send's.  A user greps the log for "TLS handshake failed".
    events = Events()
    srv = Server(echo_session(events), backend, workers=0, ssl=server_context(pki)).start()
    try:
        bad = connect(srv.address)
        bad.sendall(client_hello())
        reset(bad)
        reason = _handshake_failure_then_good_client(srv, events, pki)
    finally:
        srv.stop()
    assert len(events.of("connected")) == 1          # the good client only


def _handshake_failure_then_good_client(srv, events, pki):
    """(A server started with workers=0.)  Dispatch until the cut client's session has
    ended with a "TLS handshake failed" reason; then, with a worker, a good client must
    still be served.  Returns the reason."""
    for _ in range(200):
        if events.of("disconnected"):
            break
        srv.core.Dispatch(50)
    (reason,), = events.of("disconnected")
    assert reason.startswith("TLS handshake failed: "), reason
    srv.threads.append(_dispatching(srv))
    assert_good_client_works(srv.address, pki)
    return reason


def _dispatching(srv):
    """A worker thread for a server started with workers=0 (stop() joins it)."""
    t = threading.Thread(target=srv._worker, daemon=True)
    t.start()
    return t


_ABANDON_BROADCAST = """
import sys, time
import iocpnet
from socket import create_connection

ended = []

class Chatty(iocpnet.Session):
    def OnConnected(self):
        room.Add(self)

    def OnDisconnected(self, reason):
        ended.append(reason)
        room.Broadcast(b"bye")            # to the others, abandoned with it

core = iocpnet.IocpCore(sys.argv[1])
room = iocpnet.Group(core)
service = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), Chatty, 4)
service.Start()
peers = [create_connection(("127.0.0.1", service.listener.port)) for _ in range(3)]
deadline = time.monotonic() + 10
while len(room) < 3 and time.monotonic() < deadline:
    core.Dispatch(10)
core.Close(0)
print("ended:", sorted(ended))
"""


def test_a_broadcast_from_an_abandoned_session_ends_no_other_with_a_port_error(backend):
    # Close(0) with nobody dispatching ends the sessions it abandons itself, one after
    # another; the first one's OnDisconnected broadcast to the others, still open, and
    # their send found the port shut: they ended 'completion port is closed' instead of
    # 'server shutdown'.  (A child process: the abandoned operations keep their
    # references, as documented.)
    with Proc.python("-c", _ABANDON_BROADCAST, backend) as p:
        assert p.wait(30) == 0, p.output
    assert "ended: ['server shutdown', 'server shutdown', 'server shutdown']" in p.output, \
        p.output


def test_a_misconfigured_websocket_class_logs_its_traceback_once(backend, caplog_iocpnet):
    # Every connection a websocket Listener refuses for its session class's bad
    # settings logged the whole traceback: a client retrying in a loop filled the log.
    # One line per refusal that says why; the traceback once per class.  And the
    # figures balance: such a refusal was an accept counted nowhere else (not a
    # session, not a refusal).
    class Bad(iocpnet.Session):
        max_message_size = 0

    core = iocpnet.IocpCore(backend)
    listener = iocpnet.Listener(("127.0.0.1", 0), websocket=True)
    service = iocpnet.Service(core, listener, Bad, 1)
    service.Start()
    worker = threading.Thread(target=lambda: [None for _ in iter(
        lambda: core.Dispatch() >= 0, False)])
    worker.start()
    try:
        for _ in range(4):
            try:           # refused with a reset, maybe before connect() returned
                with connect(listener.address, timeout=5) as c:
                    assert c.recv(16) == b""
            except ConnectionResetError:
                pass
        wait_for(lambda: sum("cannot make" in r.getMessage()
                             for r in caplog_iocpnet.records) >= 4, 10, "4 refusals logged")
        st = service.stats()
    finally:
        service.Stop(5)
        core.Close(5)
        worker.join(5)
        del core, listener, service     # a failure's traceback must not keep them
    refusals = [r for r in caplog_iocpnet.records if "cannot make" in r.getMessage()]
    assert len(refusals) == 4, [r.getMessage() for r in refusals]
    for r in refusals:
        assert "max_message_size must be positive" in r.getMessage(), r.getMessage()
    assert [r.exc_info is not None for r in refusals] == [True, False, False, False]
    assert st["accepts"] == 4 and st["sessions"]["total"] == 0, st
    assert st["refused"].get("bad_session_class") == 4, st["refused"]


def _handshake_lines(caplog, reason):
    return [r for r in caplog.records if r.name == "iocpnet" and reason in r.getMessage()]


@pytest.mark.parametrize("how", ["half-hello-reset", "hello-reset-before-reply",
                                 "reset-without-a-byte"])
def test_a_handshake_cut_by_an_io_error_is_logged_once(backend, pki, caplog_iocpnet, how):
    # A handshake ended by a reset (seen by the receive) or by the failed send of our
    # flight set 'TLS handshake failed: ...' as the reason but wrote no log line, while
    # a FIN or a bad record did: an operator grepping the log saw nothing.  One line,
    # at WARNING once the peer sent something, INFO for a bare connect-and-reset.
    events = Events()
    srv = Server(echo_session(events), backend, workers=0, ssl=server_context(pki)).start()
    try:
        bad = connect(srv.address)
        hello = client_hello()
        if how == "half-hello-reset":
            bad.sendall(hello[:len(hello) // 2])
            for _ in range(4):           # the server reads the half (nothing to answer)
                srv.core.Dispatch(20)
        elif how == "hello-reset-before-reply":
            bad.sendall(hello)           # read and answered after the reset below
        reset(bad)
        reason = _handshake_failure_then_good_client(srv, events, pki)
    finally:
        srv.stop()
    lines = _handshake_lines(caplog_iocpnet, reason)
    assert len(lines) == 1, [r.getMessage() for r in caplog_iocpnet.records]
    want = logging.INFO if how == "reset-without-a-byte" else logging.WARNING
    assert lines[0].levelno == want, lines[0]


@pytest.mark.skipif(bool(sysconfig.get_config_var("Py_GIL_DISABLED")),
                    reason="free-threaded CPython keeps a class alive while a thread that "
                           "made instances of it holds a reference of its own: not ours")
def test_a_refused_websocket_class_is_not_kept_by_the_listener(backend):
    # The listener remembers which refused classes had their traceback logged: held
    # strongly, a factory (or a plugin reload) making a new class per connection kept
    # every class, and all it references, for the listener's lifetime.
    made = []

    def factory():
        class Bad(iocpnet.Session):
            max_message_size = 0
        made.append(weakref.ref(Bad))
        return Bad()

    core = iocpnet.IocpCore(backend)
    listener = iocpnet.Listener(("127.0.0.1", 0), websocket=True)
    service = iocpnet.Service(core, listener, factory, 1)
    service.Start()
    worker = threading.Thread(target=lambda: [None for _ in iter(
        lambda: core.Dispatch() >= 0, False)])
    worker.start()
    try:
        for _ in range(3):
            try:
                with connect(listener.address, timeout=5) as c:
                    assert c.recv(16) == b""
            except ConnectionResetError:
                pass
        wait_for(lambda: service.stats()["refused"].get("bad_session_class") == 3, 10,
                 "3 refusals")
    finally:
        service.Stop(5)
        core.Close(5)
        worker.join(5)
    gc.collect()                      # the listener still held
    alive = [r for r in made[:3] if r() is not None]
    assert not alive, f"{len(alive)} of 3 refused classes still alive: {alive}"
    del core, listener, service


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_one_send_larger_than_the_send_queue_limit_is_not_blamed_on_the_peer(
        backend, pki, tls):
    # One Send of 16 MiB with send_queue_limit 64 KiB (a map or a file sent whole) cut
    # the session "(the peer is not reading)": a peer reading as fast as it could was
    # blamed for the sender's one oversized message.  The cut stays (the limit is a
    # hard limit), with a reason that names the Send.
    events = Events()
    blob = bytes(16 << 20)

    class Big(iocpnet.Session):
        send_queue_limit = 64 * 1024

        def OnConnected(self):
            events.add("sent", self.Send(blob))

        def OnDisconnected(self, reason):
            events.add("disconnected", reason)

    srv = Server(Big, backend, ssl=server_context(pki) if tls else None).start()
    try:
        if tls:
            with tls_connect(srv.address, client_context(pki)) as c:
                events.wait("disconnected")
        else:
            c = socket.socket()
            try:
                c.connect(srv.address)
            except ConnectionResetError:
                pass              # the server's reset can beat connect() back to us
            with c:
                events.wait("disconnected")
    finally:
        srv.stop()
    assert events.of("sent") == [(False,)]
    (reason,), = events.of("disconnected")
    assert reason.startswith("send queue limit exceeded: "), reason
    assert "one Send of 16777216 bytes" in reason and "not reading" not in reason, reason


def test_a_flood_of_failed_tls_handshakes_is_logged_once_per_burst(backend, pki,
                                                                     caplog_iocpnet):
    # Each failed handshake wrote its line: a peer opening connections that speak
    # anything but TLS (or connect and reset) wrote one line each to the log, as fast
    # as it could connect.  A burst logs its first few lines, then one line counting
    # the rest, once the burst is quiet (every failure still in the stats).
    events = Events()
    srv = Server(echo_session(events), backend, ssl=server_context(pki)).start()
    n = 120
    try:
        for i in range(n):
            bad = connect(srv.address)
            if i % 3 == 2:
                reset(bad)                                  # bare connect and reset
                continue
            bad.sendall(b"GET / HTTP/1.0\r\n\r\n" if i % 3 == 0 else
                        client_hello()[:40] + b"\x00" * 600)    # not TLS / a bad hello
            try:
                bad.recv(4096)
            except OSError:
                pass
            bad.close()
        wait_for(lambda: len(events.of("disconnected")) == n, 30, f"{n} sessions ended")
        full, counts, total = logged_per_burst(caplog_iocpnet, "TLS handshake failures",
                                               r"TLS handshake failed: ")
        assert_good_client_works(srv.address, pki)
    finally:
        srv.stop()
    assert_logged_per_burst(full, counts, total, n)
    assert srv.service.stats()["sessions"]["total"] == n + 1
