"""Peers that go away at the worst moment (attack round, session 9): what the user reads
in OnDisconnected and the log must name what failed, and the server goes on."""
import socket
import struct
import threading

import pytest

import iocpnet
from conftest import Server, connect, wait_for
from subproc import Proc
from test_tls import (Events, assert_good_client_works, client_hello, echo_session, pki,
                      server_context)
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
        for _ in range(200):
            if events.of("disconnected"):
                break
            srv.core.Dispatch(50)
        (reason,), = events.of("disconnected")
        assert reason.startswith("TLS handshake failed: "), reason
        srv.threads.append(_dispatching(srv))
        assert_good_client_works(srv.address, pki)
    finally:
        srv.stop()
    assert len(events.of("connected")) == 1          # the good client only


def _dispatching(srv):
    """A worker thread for a server started with workers=0 (stop() joins it)."""
    t = threading.Thread(target=srv._worker, daemon=True)
    t.start()
    return t
