"""wss: WebSocket over the TLS stream filter, server and client, against the
`websockets` library's client and server (code nobody here wrote), on every backend;
the chat packets over wss beside native TLS clients; ``echo --websocket --tls-cert``.

The `websockets` client here is its asyncio one, never its threaded one
(websockets.sync): that one reads its TLS socket in a thread while the caller's thread
writes it, one SSL object used by two threads at once, which OpenSSL does not support.
On free-threaded CPython 3.13 its upgrade request was then sometimes lost inside the
client ("timed out while waiting for handshake response": its socket's bytes_sent
stopped at the 597 bytes of its TLS handshake; websockets' own server saw the same from
it), and once the process crashed in ssl.send.  The asyncio client drives each
connection from one thread."""
import asyncio
import contextlib
import os
import socket
import ssl
import threading
import time

import pytest

websockets = pytest.importorskip("websockets")
from websockets.asyncio.client import connect as ws_connect  # noqa: E402

import iocpnet  # noqa: E402
import packet_reference as ref  # noqa: E402
import ws_raw  # noqa: E402
from conftest import wait_for  # noqa: E402
from subproc import Proc  # noqa: E402
from tls_certs import OPENSSL, make_pki  # noqa: E402

pytestmark = [pytest.mark.skipif(OPENSSL is None, reason="the openssl command is missing")]


async def until(predicate, timeout=10.0):
    """Poll without blocking the event loop (the websockets client runs on it)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki-ws"))


def server_ctx(pki):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki["server"], pki["server_key"])
    return ctx


def client_ctx(pki):
    return ssl.create_default_context(cafile=pki["ca"])


class Echo(iocpnet.WebSocketSession):
    def OnMessage(self, data, binary):
        self.SendMessage(data)


def run_core(core, n=2):
    threads = [threading.Thread(target=lambda: [0 for _ in iter(
        lambda: core.Dispatch() >= 0, False)], daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


@contextlib.contextmanager
def wss_server(backend, pki, session_cls, accepts=8, websocket=False):
    """A Service of `session_cls` on a TLS Listener (``websocket``: the Listener's
    flag, for a session class that is not a WebSocketSession) of a new core with 2
    worker threads: yields (core, service); on exit the service is stopped, the core
    closed and the workers joined."""
    core = iocpnet.IocpCore(backend)
    svc = None
    threads = []
    try:
        svc = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0), ssl=server_ctx(pki),
                                                     websocket=websocket),
                              session_cls, accepts)
        svc.Start()
        threads = run_core(core)
        yield core, svc
    finally:
        if svc is not None:
            svc.Stop(5)
        core.Close(5)
        for t in threads:
            t.join(5)


def test_wss_server_with_a_websockets_client(backend, pki):
    async def scenario(svc):
        url = f"wss://localhost:{svc.listener.port}/secure"
        async with ws_connect(url, ssl=client_ctx(pki), max_size=None) as ws:
            await ws.send("über TLS ✓")
            assert await ws.recv() == "über TLS ✓"
            big = os.urandom(1 << 20)
            await ws.send(big)
            assert await ws.recv() == big
            await ws.send([b"frag", b"mented"])
            assert await ws.recv() == b"fragmented"
            await asyncio.wait_for(await ws.ping(b"x"), 5)
            await ws.close(4001, "done")
        # Plain ws:// to the wss port is refused by TLS, and the server goes on.
        with pytest.raises(Exception):
            async with ws_connect(f"ws://127.0.0.1:{svc.listener.port}/", open_timeout=5):
                pass
        async with ws_connect(url, ssl=client_ctx(pki)) as ws:
            await ws.send("still here")
            assert await ws.recv() == "still here"

    with wss_server(backend, pki, Echo) as (core, svc):
        asyncio.run(scenario(svc))


class _BioClient:
    """A TLS client over memory BIOs on a plain socket, one thread: it decides which
    records share a write (what a hurried client or a proxy does)."""

    def __init__(self, address, ctx):
        self.sock = socket.create_connection(address, timeout=10)
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.inc, self.out, server_hostname="localhost")
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if self.out.pending:
                    self.sock.sendall(self.out.read())
                self._more()
        # The client's Finished stays in self.out: the caller's first write takes it.

    def _more(self):
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed by the server")
        self.inc.write(data)

    def write(self, data):
        self.tls.write(data)
        self.sock.sendall(self.out.read())

    def read_until(self, marker, have=b""):
        while marker not in have:
            try:
                have += self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._more()
        return have


def test_upgrade_request_and_a_frame_in_the_write_that_ends_the_tls_handshake(backend, pki):
    """The client's last handshake records, its upgrade request and a first frame
    arrive in one segment: the handshake completes, the request is answered, the
    frame echoed (the plaintext that came with the handshake is not left behind)."""
    with wss_server(backend, pki, Echo) as (core, svc):
        for _ in range(5):
            c = _BioClient(("127.0.0.1", svc.listener.port), client_ctx(pki))
            req, key = ws_raw.upgrade_request("/x")
            c.write(req + ws_raw.frame(0x1, b"first"))
            got = c.read_until(b"\r\n\r\n")
            head, _, rest = got.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 "), head
            assert f"Sec-WebSocket-Accept: {ws_raw.accept_key(key)}".encode() in head
            rest = c.read_until(b"first", rest)
            assert rest == ws_raw.frame(0x1, b"first", mask=False)
            c.sock.close()


def test_no_data_frame_follows_the_close_frame_over_tls(backend, pki):
    """RFC 6455 5.5.1 over wss: threads send while another closes; whatever SendMessage
    accepted arrives before the close frame, nothing after it.  Through TLS the race
    was open even with a GIL: a send that had passed the "closing?" check waited for
    the TLS filter's mutex (the GIL released), and the close frame could take the
    mutex first."""
    import queue
    sessions = queue.Queue()

    class S(iocpnet.WebSocketSession):
        ping_interval = 0

        def OnConnected(self):
            sessions.put(self)

    with wss_server(backend, pki, S) as (core, svc):
        for _ in range(30):
            accepted, frames, close, trailing = ws_raw.close_race(
                ("127.0.0.1", svc.listener.port), lambda: sessions.get(timeout=10),
                ssl=client_ctx(pki))
            assert close == (1000, "race")
            assert trailing == b"", f"{len(trailing)} bytes after the close frame"
            assert frames == accepted


def test_our_wss_client_against_a_websockets_server(backend, pki):
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state = {}

    async def echo(ws):
        async for m in ws:
            await ws.send(m)

    def serve():
        from websockets.asyncio.server import serve as ws_serve

        async def main():
            state["stop"] = asyncio.Event()
            async with ws_serve(echo, "127.0.0.1", 0, ssl=server_ctx(pki),
                                max_size=None) as server:
                state["port"] = server.sockets[0].getsockname()[1]
                ready.set()
                await state["stop"].wait()

        loop.run_until_complete(main())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert ready.wait(10)
    got = []
    done = threading.Event()
    big = os.urandom(200000)

    class Client(iocpnet.WebSocketSession):
        def OnConnected(self):
            got.append(self.tls_version)
            self.SendMessage("hello over wss")
            self.SendMessage(big)

        def OnMessage(self, data, binary):
            got.append(data)
            if len(got) == 3:
                self.Close()

        def OnDisconnected(self, reason):
            got.append(reason)
            done.set()

    core = iocpnet.IocpCore(backend)
    try:
        svc = iocpnet.ClientService(core, f"wss://localhost:{state['port']}/x", Client, 1,
                                    ssl=client_ctx(pki))
        svc.Start()
        deadline = time.monotonic() + 15
        while not done.is_set() and time.monotonic() < deadline:
            core.Dispatch(50)
        assert got[0] in ("TLSv1.2", "TLSv1.3")
        assert got[1:] == ["hello over wss", big, "WebSocket closed (1000)"]
        svc.Stop(5)
    finally:
        core.Close(5)
        loop.call_soon_threadsafe(state["stop"].set)
        t.join(10)
        loop.close()


def test_wss_url_without_ssl_uses_the_default_context_and_refuses_an_unknown_ca(backend, pki):
    """wss:// with no ssl= verifies against the system's CAs: our test CA is unknown,
    so the handshake fails with a reason, as a browser would refuse it."""
    failed = []

    class Client(iocpnet.WebSocketSession):
        def OnConnectFailed(self, reason):
            failed.append(reason)

    with wss_server(backend, pki, Echo, 4) as (core, server):
        svc = iocpnet.ClientService(core, f"wss://localhost:{server.listener.port}/",
                                    Client, 1)
        assert svc.ssl is not None
        svc.Start()
        wait_for(lambda: failed)
        assert failed[0].startswith("TLS handshake failed"), failed
        svc.Stop(5)


def test_packets_over_wss_beside_native_tls_clients(backend, pki):
    class Room(iocpnet.PacketSession):
        def OnRecvPacket(self, packet_id, payload):
            self.service.Broadcast(iocpnet.make_packet(packet_id, payload))

    got = []

    class Bot(iocpnet.PacketSession):
        def OnConnected(self):
            self.SendPacket(3, b"from a bot over wss")

        def OnRecvPacket(self, packet_id, payload):
            got.append((packet_id, payload))
            self.Disconnect("done")

    async def scenario(core, web):
        url = f"wss://localhost:{web.listener.port}/"
        async with ws_connect(url, ssl=client_ctx(pki)) as ws:
            await ws.send(ref.encode(1, b"browser"))
            assert await asyncio.wait_for(ws.recv(), 5) == ref.encode(1, b"browser")
            bots = iocpnet.ClientService(core, url, Bot, 1, ssl=client_ctx(pki))
            bots.Start()
            assert await asyncio.wait_for(ws.recv(), 5) == \
                ref.encode(3, b"from a bot over wss")
            await until(lambda: got and bots.session_count == 0)
            assert got == [(3, b"from a bot over wss")]
            bots.Stop(5)

    with wss_server(backend, pki, Room, websocket=True) as (core, web):
        asyncio.run(scenario(core, web))


def test_echo_command_wss(backend, pki):
    with Proc.python("-m", "iocpnet", "--backend", backend, "echo", "--host", "127.0.0.1",
                     "--port", 0, "--websocket", "--tls-cert", pki["server"],
                     "--tls-key", pki["server_key"], "--workers", 2) as p:
        port = p.port(r"WebSocket echo server \(wss\) on 127\.0\.0\.1:(\d+)")
        async def echo_once():
            async with ws_connect(f"wss://localhost:{port}/", ssl=client_ctx(pki)) as ws:
                await ws.send("secure echo")
                assert await ws.recv() == "secure echo"

        asyncio.run(echo_once())
        d = Proc.python("-m", "iocpnet", "--backend", backend, "dummy-client", "--port", port,
                        "--host", "localhost", "--websocket", "--tls", "--tls-ca", pki["ca"],
                        "--clients", 4, "--seconds", 1, "--interval", 0.5)
        assert d.wait(60) == 0, d.output
        assert "errors       0" in d.output
