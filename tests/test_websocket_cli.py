"""The command line over WebSocket: ``echo --websocket`` against the `websockets`
library's client (each message back with its type), and ``dummy-client --websocket``
against it and against the chat example's packets carried in binary messages."""
import re
import signal
import threading

import pytest

websockets = pytest.importorskip("websockets")
from websockets.sync.client import connect as ws_connect  # noqa: E402

import iocpnet  # noqa: E402

from conftest import wait_for  # noqa: E402
from subproc import Proc, load_example  # noqa: E402


def iocpnet_cli(backend, *args):
    return Proc.python("-m", "iocpnet", "--backend", backend, *args)


def summary(out, what):
    m = re.search(rf"^  {what} +([\d,]+)", out, re.M)
    assert m, out
    return int(m.group(1).replace(",", ""))


def test_echo_websocket_command(backend):
    with iocpnet_cli(backend, "echo", "--host", "127.0.0.1", "--port", 0,
                     "--websocket", "--workers", 2) as p:
        port = p.port(r"WebSocket echo server on 127\.0\.0\.1:(\d+)")
        with ws_connect(f"ws://127.0.0.1:{port}/any/path") as ws:
            ws.send("text ✓")
            assert ws.recv() == "text ✓"
            ws.send(b"\x00binary")
            assert ws.recv() == b"\x00binary"
        d = iocpnet_cli(backend, "dummy-client", "--port", port, "--websocket",
                        "--clients", 10, "--seconds", 1, "--interval", 0.5, "--size", 2000)
        assert d.wait(60) == 0, d.output
        assert "10 echo clients over WebSocket" in d.output
        assert summary(d.output, "errors") == 0 and summary(d.output, "round trips") > 0
        p.signal(signal.SIGTERM)
        assert p.wait() == 0, p.output
        assert re.search(r"pid \d+: stopped after 2 sessions", p.output) or \
            re.search(r"stopped after \d+ sessions", p.output), p.output


def test_dummy_client_websocket_chat_against_a_websocket_listener(backend):
    """The chat server's own PacketSession on a websocket Listener: the chat load
    client, unchanged, sends its packets in binary messages."""
    state = load_example("chat_server").ChatServer(say_rate=0)
    core = iocpnet.IocpCore(backend)
    svc = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0), websocket=True),
                          state.session_factory, 32)
    svc.Start()
    threads = [threading.Thread(target=lambda: [0 for _ in iter(
        lambda: core.Dispatch() >= 0, False)], daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        d = iocpnet_cli(backend, "dummy-client", "--port", svc.listener.port, "--websocket",
                        "--protocol", "chat", "--clients", 8, "--room-size", 4,
                        "--seconds", 1.5, "--interval", 0.5)
        assert d.wait(60) == 0, d.output
        assert summary(d.output, "errors") == 0 and summary(d.output, "round trips") > 0
        wait_for(lambda: svc.session_count == 0, message="the load to leave")
        assert not state.rooms and not state.nicks
    finally:
        svc.Stop(5)
        core.Close(5)
        for t in threads:
            t.join(5)
    del state


def test_dummy_client_websocket_against_a_plain_tcp_server_fails(backend):
    """A WebSocket client aimed at a server that never answers the upgrade: every
    client reports the handshake failure and the tool exits non-zero."""
    class Silent(iocpnet.Session):
        def OnRecv(self, data):
            return None

    core = iocpnet.IocpCore(backend)
    svc = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), Silent, 8)
    svc.Start()
    t = threading.Thread(target=lambda: [0 for _ in iter(lambda: core.Dispatch() >= 0,
                                                         False)], daemon=True)
    t.start()
    try:
        d = iocpnet_cli(backend, "dummy-client", "--port", svc.listener.port, "--websocket",
                        "--clients", 2, "--seconds", 1, "--grace", 1)
        assert d.wait(60) == 1, d.output
        assert summary(d.output, "errors") >= 2
    finally:
        svc.Stop(5)
        core.Close(5)
        t.join(5)
