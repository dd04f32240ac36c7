"""TLS: Listener(ssl=ctx) and ClientService(ssl=ctx), against clients nobody here wrote
(Python's ssl module, openssl s_client) and hostile ones, on every backend.  Hooks see
plaintext; order, limits, Disconnect and OnDisconnected keep their meaning.

Certificates are made when the tests run (tests/tls_certs.py)."""
import hashlib
import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time

import pytest

import iocpnet
from conftest import connect, assert_logged_per_burst, logged_per_burst, recv_exactly, wait_for
from test_services import ClientCore
from tls_certs import OPENSSL, make_pki

# The certificates are made with the openssl command (scripts/test.sh installs it).
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is missing")

VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def server_context(pki, *, alpn=None, client_ca=None, version=None):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki["server"], pki["server_key"])
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    if version:
        ctx.minimum_version = ctx.maximum_version = VERSIONS[version]
    return ctx


def client_context(pki, *, cafile=None, version=None, alpn=None, cert=None):
    ctx = ssl.create_default_context(cafile=cafile or pki["ca"])
    if version:
        ctx.minimum_version = ctx.maximum_version = VERSIONS[version]
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if cert:
        ctx.load_cert_chain(*cert)
    return ctx


def tls_connect(address, ctx, server_hostname="localhost", timeout=10):
    raw = connect(address, timeout)
    try:
        return ctx.wrap_socket(raw, server_hostname=server_hostname,
                               suppress_ragged_eofs=False)
    except BaseException:
        raw.close()
        raise


def recv_all(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def client_hello():
    """The bytes of a real ClientHello (made by the ssl module into a memory BIO)."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert hello[0] == 0x16 and len(hello) > 100     # a handshake record
    return hello


class Events:
    """What the sessions of one test saw, thread-safe; keeps no session alive."""

    def __init__(self):
        self.lock = threading.Lock()
        self.log = []

    def add(self, *event):
        with self.lock:
            self.log.append(event)

    def of(self, kind):
        with self.lock:
            return [e[1:] for e in self.log if e[0] == kind]

    def wait(self, kind, n=1, timeout=10):
        wait_for(lambda: len(self.of(kind)) >= n, timeout,
                 f"{n} {kind} event(s), have {self.log!r}")
        return self.of(kind)


def echo_session(events, **attrs):
    class TlsEcho(iocpnet.Session):
        def OnConnected(self):
            events.add("connected", self.tls_version, self.tls_alpn)

        def OnRecv(self, data):
            events.add("recv", len(data))
            self.Send(data)

        def OnDisconnected(self, reason):
            events.add("disconnected", reason)

    for k, v in attrs.items():
        setattr(TlsEcho, k, v)
    return TlsEcho


def assert_good_client_works(address, pki, payload=b"still here"):
    with tls_connect(address, client_context(pki)) as c:
        c.sendall(payload)
        assert recv_all(c, len(payload)) == payload


# ---- clients nobody here wrote ----

@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_python_ssl_client_8_mib_each_way_byte_exact(server, pki, version):
    """8 MiB of random bytes to the server and back through TLS: the server's digest of
    what it received and the client's copy of the echo match what was sent."""
    digest = hashlib.sha256()
    got = []
    events = Events()

    class Hashing(iocpnet.Session):
        send_queue_limit = 32 << 20

        def OnConnected(self):
            events.add("connected", self.tls_version)

        def OnRecv(self, data):
            digest.update(data)
            got.append(len(data))
            self.Send(data)

        def OnDisconnected(self, reason):
            events.add("disconnected", reason)

    srv = server(Hashing, ssl=server_context(pki))
    payload = os.urandom(8 << 20)
    echoed = bytearray()
    with tls_connect(srv.address, client_context(pki, version=version)) as c:
        assert c.version() == version
        # One thread per socket (an SSLSocket must not be read and written at once):
        # write 64 KiB, read back all but the last 256 KiB sent, so both directions
        # carry data the whole time.
        chunk = 64 << 10
        for pos in range(0, len(payload), chunk):
            c.sendall(payload[pos:pos + chunk])
            while len(echoed) < pos + chunk - (256 << 10):
                echoed += c.recv(1 << 20)
        while len(echoed) < len(payload):
            data = c.recv(1 << 20)
            assert data, f"closed after {len(echoed)} bytes"
            echoed += data
        assert bytes(echoed) == payload
        c.unwrap()                   # our close_notify; the server answers with its own
    events.wait("disconnected")
    assert events.of("connected") == [(version,)]
    assert events.of("disconnected") == [("peer closed the connection",)]
    assert sum(got) == len(payload)
    assert digest.digest() == hashlib.sha256(payload).digest()


def test_fifty_python_clients_at_once(server, pki):
    events = Events()
    srv = server(echo_session(events), ssl=server_context(pki), accepts=8)
    errors = []

    def client(i):
        try:
            data = os.urandom(64 << 10) + str(i).encode()
            with tls_connect(srv.address, client_context(pki)) as c:
                c.sendall(data)
                assert recv_all(c, len(data)) == data
        except BaseException as e:      # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    events.wait("disconnected", 50)
    assert len(events.of("connected")) == 50


@pytest.mark.parametrize("flag,version", [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")])
def test_openssl_s_client_with_sni_and_alpn(server, pki, flag, version):
    """openssl s_client: the echo comes back, the server saw the SNI name and the ALPN
    protocol, and Disconnect ends s_client with a close_notify (it exits by itself)."""
    events = Events()
    names = []
    ctx = server_context(pki, alpn=["game/1"])
    ctx.sni_callback = lambda obj, name, c: names.append(name)

    class Quitting(iocpnet.Session):
        def OnConnected(self):
            events.add("connected", self.tls_version, self.tls_alpn)

        def OnRecv(self, data):
            self.Send(data)
            if b"quit" in bytes(data):
                self.Disconnect("quit")

        def OnDisconnected(self, reason):
            events.add("disconnected", reason)

    srv = server(Quitting, ssl=ctx)
    proc = subprocess.Popen(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{srv.port}", flag,
         "-servername", "game.test", "-alpn", "game/1", "-CAfile", pki["ca"],
         "-verify_return_error", "-ign_eof"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(b"hello over tls\nquit\n", timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode("utf-8", "replace")
    assert "hello over tls" in text and "quit" in text, text
    assert "Verify return code: 0 (ok)" in text, text
    assert "ALPN protocol: game/1" in text, text
    assert version in text, text
    assert events.of("connected") == [(version, "game/1")]
    events.wait("disconnected")
    assert events.of("disconnected") == [("quit",)]
    assert names == ["game.test"]


def test_openssl_key_update_mid_stream(server, pki):
    """TLS 1.3 KeyUpdate from s_client ("K": and ask us to update ours; "k": only its
    own): the server follows the new keys both ways, the echo goes on."""
    events = Events()

    class Quitting(iocpnet.Session):
        def OnRecv(self, data):
            self.Send(data)
            if b"quit" in bytes(data):
                self.Disconnect("quit")

        def OnDisconnected(self, reason):
            events.add("disconnected", reason)

    srv = server(Quitting, ssl=server_context(pki))
    # Without -ign_eof, so that s_client reads "K" and "k" as commands.
    proc = subprocess.Popen(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{srv.port}", "-tls1_3",
         "-CAfile", pki["ca"], "-verify_return_error"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout))
    reader.start()

    def seen(text, n=1):
        return sum(text.encode() in line for line in list(lines)) >= n

    try:
        # Each line waits for the one before to be done: s_client drops what follows a
        # command in the same read of its input.
        for line, expect, n in (("before", "before", 1), ("K", "KEYUPDATE", 1),
                                ("after-both", "after-both", 1), ("k", "KEYUPDATE", 2),
                                ("after-own", "after-own", 1), ("quit", "quit", 1)):
            proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()
            wait_for(lambda: seen(expect, n), 10, f"{expect!r} from s_client")
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(10)
        proc.stdin.close()
        proc.stdout.close()
    assert events.wait("disconnected") == [("quit",)]


def test_client_renegotiation_is_refused(server, pki):
    """TLS 1.2 renegotiation asked by the client (s_client's "R"): refused, as OpenSSL
    refuses it by default; that session ends with a reason, the others go on."""
    events = Events()
    srv = server(echo_session(events), ssl=server_context(pki, version="TLSv1.2"))
    proc = subprocess.Popen(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{srv.port}", "-tls1_2",
         "-CAfile", pki["ca"]],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with tls_connect(srv.address, client_context(pki)) as good:
            events.wait("connected", 2)
            proc.stdin.write(b"R\n")
            proc.stdin.flush()
            (reason,), = events.wait("disconnected")
            assert reason.startswith("TLS error: "), reason
            good.sendall(b"unharmed")
            assert recv_all(good, 8) == b"unharmed"
    finally:
        proc.kill()
        proc.communicate()


# ---- hostile and broken peers; a good client beside them loses nothing ----

def test_plaintext_sent_to_a_tls_port(server, pki, caplog_iocpnet):
    events = Events()
    srv = server(echo_session(events), ssl=server_context(pki))
    with tls_connect(srv.address, client_context(pki)) as good:
        good.sendall(b"before")
        assert recv_all(good, 6) == b"before"
        with connect(srv.address) as bad:
            bad.sendall(b"GET / HTTP/1.1\r\nHost: game.test\r\n\r\n")
            answer = b""
            try:
                while True:
                    chunk = bad.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
            except ConnectionResetError:
                pass
        assert b"HTTP" not in answer          # nothing but (maybe) a TLS alert
        (reason,), = events.wait("disconnected")
        assert reason.startswith("TLS handshake failed: "), reason
        assert "http request" in reason.lower() or "wrong version" in reason.lower(), reason
        assert any("TLS handshake failed" in r.getMessage() for r in caplog_iocpnet.records)
        good.sendall(b"after")
        assert recv_all(good, 5) == b"after"
    assert len(events.of("connected")) == 1          # the good client only


@pytest.mark.parametrize("how", ["fin", "reset"])
def test_cut_client_hello(server, pki, how):
    events = Events()
    srv = server(echo_session(events), ssl=server_context(pki))
    hello = client_hello()
    with tls_connect(srv.address, client_context(pki)) as good:
        bad = connect(srv.address)
        bad.sendall(hello[:len(hello) // 2])
        time.sleep(0.1)
        if how == "reset":
            bad.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        bad.close()
        (reason,), = events.wait("disconnected")
        if how == "fin":
            assert reason == ("TLS handshake failed: peer closed the connection during the "
                              "handshake"), reason
        else:
            assert reason.startswith("TLS handshake failed: ") and "reset" in reason, reason
        good.sendall(b"unharmed")
        assert recv_all(good, 8) == b"unharmed"
    assert len(events.of("connected")) == 1


def handshaken_raw(address, pki):
    """A TLS client whose handshake is done by hand over a plain socket (a memory BIO),
    so that the test can then send the server any bytes it likes."""
    sock = connect(address)
    ctx = client_context(pki)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            data = sock.recv(65536)
            assert data, "closed during the handshake"
            incoming.write(data)
    sock.sendall(outgoing.read())
    return sock, obj


@pytest.mark.parametrize("record", [
    b"\x17\x03\x03\xea\x60" + b"x" * 100,          # a length no record may have
    b"\x17\x03\x03\x00\x40" + os.urandom(64),       # a record that does not decrypt
], ids=["too-long", "forged"])
def test_bad_records_after_the_handshake(server, pki, record, caplog_iocpnet):
    """After the handshake: a record too long to exist is refused at its header (not
    after buffering 60 KB), a forged one at its tag; each ends that session only."""
    events = Events()
    srv = server(echo_session(events), ssl=server_context(pki))
    with tls_connect(srv.address, client_context(pki)) as good:
        bad, _ = handshaken_raw(srv.address, pki)
        with bad:
            events.wait("connected", 2)
            bad.sendall(record)
            (reason,), = events.wait("disconnected")
            assert reason.startswith("TLS error: "), reason
        good.sendall(b"fine")
        assert recv_all(good, 4) == b"fine"


def test_a_flood_of_bad_records_is_logged_once_per_burst(server, pki, caplog_iocpnet):
    # A peer that completes the handshake and then sends a record that does not
    # decrypt, connection after connection, wrote a WARNING per connection ("TLS error:
    # ..."): each is still cut with its reason; the log has a burst's first lines and
    # a count, as for failed handshakes.
    events = Events()
    srv = server(echo_session(events), ssl=server_context(pki))
    n = 40
    for i in range(n):
        bad, _ = handshaken_raw(srv.address, pki)
        with bad:
            bad.sendall(b"\x17\x03\x03\x00\x40" + os.urandom(64))
            events.wait("disconnected", i + 1)
    assert all(r.startswith("TLS error: ") for r, in events.of("disconnected"))
    full, counts, total = logged_per_burst(caplog_iocpnet, "TLS errors",
                                           r": TLS error: ")
    assert_logged_per_burst(full, counts, total, n)


def test_handshake_deadline(server, pki):
    """A client that connects and stalls (silent, or half a ClientHello) is cut at
    tls_handshake_timeout; the session never saw OnConnected."""
    events = Events()
    # 2 s, not less: the good client below shares the deadline and must finish its own
    # handshake within it on a loaded machine (0.5 s cut it there, reset at its sendall).
    srv = server(echo_session(events, tls_handshake_timeout=2.0), ssl=server_context(pki))
    silent = connect(srv.address)
    stalled = connect(srv.address)
    stalled.sendall(client_hello()[:20])
    start = time.monotonic()
    try:
        assert_good_client_works(srv.address, pki)
        for s in (silent, stalled):
            s.settimeout(10)
            try:
                assert s.recv(4096) == b""
            except ConnectionResetError:
                pass
        assert time.monotonic() - start < 8
        reasons = [r for (r,) in events.wait("disconnected", 3)]
        assert reasons.count("TLS handshake failed: not completed within 2 s") == 2, reasons
    finally:
        silent.close()
        stalled.close()
    assert len(events.of("connected")) == 1


def test_tls_handshake_timeout_must_not_be_negative(server, pki):
    class Bad(iocpnet.Session):
        tls_handshake_timeout = -1

    with pytest.raises(ValueError, match="tls_handshake_timeout"):
        Bad()


def test_ssl_argument_must_be_a_context():
    with pytest.raises(TypeError, match="SSLContext"):
        iocpnet.Listener(("127.0.0.1", 0), ssl="cert.pem")


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_client_certificates_when_the_server_asks(server, pki, version):
    events = Events()

    class Checking(iocpnet.Session):
        def OnConnected(self):
            cert = self.tls_peer_certificate
            cn = dict(x[0] for x in cert["subject"])["commonName"]
            events.add("connected", cn, len(self.tls_peer_certificate_der) > 100)

        def OnRecv(self, data):
            self.Send(data)

        def OnDisconnected(self, reason):
            events.add("disconnected", reason)

    srv = server(Checking, ssl=server_context(pki, client_ca=pki["ca"], version=version))
    # A good certificate: through, and the server sees who it is.
    ctx = client_context(pki, cert=(pki["client"], pki["client_key"]))
    with tls_connect(srv.address, ctx) as c:
        c.sendall(b"id")
        assert recv_all(c, 2) == b"id"
    assert events.wait("connected") == [("player1", True)]
    events.wait("disconnected")
    # A certificate from another CA, and none at all: refused, each with its reason.
    for n, (cert, why) in enumerate((
            ((pki["rogue_client"], pki["rogue_client_key"]), "certificate verify failed"),
            (None, "did not return a certificate")), start=2):
        ctx = client_context(pki, cert=cert)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with tls_connect(srv.address, ctx) as c:
                # TLS 1.3: the client finishes before the server has judged its
                # certificate; the refusal comes with the first read.
                c.sendall(b"x")
                c.recv(1)
        (reason,) = events.wait("disconnected", n)[-1]
        assert reason.startswith("TLS handshake failed: ") and why in reason, reason
    assert len(events.of("connected")) == 1


def test_sni_picks_the_certificate_and_alpn_is_agreed(server, pki):
    events = Events()
    other = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    other.load_cert_chain(pki["sni"], pki["sni_key"])
    other.set_alpn_protocols(["game/1"])
    ctx = server_context(pki, alpn=["game/2", "game/1"])
    seen = []

    def pick(obj, name, c):
        seen.append(name)
        if name == "b.test":
            obj.context = other

    ctx.sni_callback = pick
    srv = server(echo_session(events), ssl=ctx)
    cctx = client_context(pki, alpn=["game/1"])
    # b.test is only in the second certificate: verifying it proves the server used it.
    with tls_connect(srv.address, cctx, server_hostname="b.test") as c:
        assert c.selected_alpn_protocol() == "game/1"
        c.sendall(b"sni")
        assert recv_all(c, 3) == b"sni"
    with tls_connect(srv.address, cctx, server_hostname="game.test") as c:
        c.sendall(b"sni")
        assert recv_all(c, 3) == b"sni"
    assert seen == ["b.test", "game.test"]
    assert [a for (_, a) in events.wait("connected", 2)] == ["game/1", "game/1"]


# ---- the session's semantics through TLS ----

def test_disconnect_flushes_then_sends_close_notify(server, pki):
    """What Send queued before Disconnect arrives whole, then a close_notify: Python's
    client reads a clean end (b""), not a ragged EOF.  Abort sends none."""
    events = Events()
    big = os.urandom(3 << 20)

    class Sender(iocpnet.Session):
        def OnConnected(self):
            events.add("connected")

        def OnRecv(self, data):
            if bytes(data) == b"bye":
                for i in range(0, len(big), 1 << 16):
                    self.Send(big[i:i + (1 << 16)])
                self.Disconnect("done")
            else:
                self.Abort("aborted")

        def OnDisconnected(self, reason):
            events.add("disconnected", reason)

    srv = server(Sender, ssl=server_context(pki))
    with tls_connect(srv.address, client_context(pki)) as c:
        c.sendall(b"bye")
        time.sleep(0.2)                   # the queue fills while we do not read
        assert recv_all(c, len(big)) == big
        assert c.recv(100) == b""         # close_notify (a ragged EOF would raise)
    with tls_connect(srv.address, client_context(pki)) as c:
        c.sendall(b"abort")
        with pytest.raises((ssl.SSLEOFError, ConnectionResetError, ssl.SSLError)):
            c.recv(100)
    assert sorted(r for (r,) in events.wait("disconnected", 2)) == ["aborted", "done"]


@pytest.mark.skipif(sys.version_info < (3, 12), reason="__buffer__ in a class: 3.12+")
def test_send_of_an_object_whose_buffer_export_sends_too(server, pki):
    """Send(obj) where obj is a Python class whose __buffer__ itself calls Send on the
    same session (user code, run whenever the buffer is asked for).  The TLS filter
    asks for it once, before taking its lock: the inner Send goes first, then obj's
    bytes, and no thread waits on a lock it holds (it asked again under the lock: the
    inner Send waited on that lock forever)."""
    got = []

    class Exporter:
        def __init__(self, session):
            self.session = session

        def __buffer__(self, flags):
            got.append(self.session.Send(b"inner,"))
            return memoryview(b"outer")

    sessions = []

    class S(iocpnet.Session):
        def OnConnected(self):
            sessions.append(self)

    srv = server(S, ssl=server_context(pki))
    try:
        with tls_connect(srv.address, client_context(pki)) as c:
            wait_for(lambda: sessions)
            t = threading.Thread(
                target=lambda: got.append(sessions[0].Send(Exporter(sessions[0]))),
                daemon=True)
            t.start()
            t.join(5)
            assert not t.is_alive(), "Send waits on itself"
            assert recv_all(c, len(b"inner,outer")) == b"inner,outer"
            assert got == [True, True]
    finally:
        sessions.clear()      # (on 3.13t the class, which refers to the list, is immortal)


def test_flush_timeout_bounds_a_disconnect_to_a_peer_that_never_reads(server, pki):
    """Disconnect with more queued than the peer will ever read: closed anyway after
    flush_timeout, with the usual reason, as without TLS."""
    events = Events()

    class Stuck(iocpnet.Session):
        flush_timeout = 0.5
        send_queue_limit = 64 << 20

        def OnConnected(self):
            chunk = b"z" * (1 << 16)
            for _ in range(128):                # 8 MiB: more than the socket buffers
                self.Send(chunk)
            self.Disconnect("bye")

        def OnDisconnected(self, reason):
            events.add("disconnected", reason)

    srv = server(Stuck, ssl=server_context(pki))
    with tls_connect(srv.address, client_context(pki)):
        start = time.monotonic()
        (reason,), = events.wait("disconnected")
        assert time.monotonic() - start < 5
    assert reason == "bye (its queued data was not flushed in time)", reason


def test_send_before_the_handshake_and_stop_during_it(server, pki):
    """A session whose handshake has not finished is not `connected`, refuses Send,
    and ends with the server's reason when the server stops; OnConnected never ran."""
    events = Events()
    srv = server(echo_session(events), ssl=server_context(pki))
    raw = connect(srv.address)
    try:
        wait_for(lambda: srv.service.session_count == 1, message="the raw connection")
        s = srv.service.sessions[0]
        assert not s.connected
        assert s.Send(b"too early") is False
        assert s.tls_version is None
        s = None
        srv.service.Stop(5)
        (reason,), = events.wait("disconnected")
        assert reason == "server shutdown"
    finally:
        raw.close()
    assert events.of("connected") == []


def test_peer_close_notify_is_answered(server, pki):
    events = Events()
    srv = server(echo_session(events), ssl=server_context(pki))
    c = tls_connect(srv.address, client_context(pki))
    try:
        c.sendall(b"x")
        assert recv_all(c, 1) == b"x"
        plain = c.unwrap()               # returns once the server's close_notify came
        assert plain.recv(10) == b""     # then the server closed TCP
        plain.close()
    finally:
        c.close()
    assert events.wait("disconnected") == [("peer closed the connection",)]


def test_send_queue_limit_counts_the_bytes_held(server, pki, caplog_iocpnet):
    """A TLS peer that stops reading while the server sends 1-byte messages: each is a
    record of 23 bytes (TLS 1.3: 5 of header, 1 of content type, 16 of tag), and
    send_queue_limit bounds what the session holds for the peer, the records.  The
    session is cut, the reason logged, when the records queued would pass the limit,
    not once 23 times the limit is held (as when the limit counted plaintext)."""
    events = Events()
    result = []
    limit = 256 << 10

    class Flooder(iocpnet.Session):
        send_queue_limit = limit

        def OnConnected(self):
            n = held = 0
            stats = self.GetService().stats
            while n < 2_000_000 and self.Send(b"x"):
                n += 1
                if n % 256 == 0:
                    held = max(held, stats()["send_queue_bytes_max"])
            result.append((n, held))

        def OnDisconnected(self, reason):
            events.add("disconnected", reason)

    srv = server(Flooder, ssl=server_context(pki, version="TLSv1.3"))
    raw = socket.socket()
    # A small receive buffer: what the kernels hold between us and the session stays
    # small beside the limit, so the messages accepted tell what the session held.
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(10)
    raw.connect(srv.address)
    with client_context(pki).wrap_socket(raw, server_hostname="localhost") as c:
        (reason,), = events.wait("disconnected", timeout=30)
    assert reason.startswith("send queue limit exceeded: ") and \
        f"send_queue_limit is {limit} " in reason, reason
    queued = int(reason.split(": ")[1].split()[0])
    assert limit < queued <= limit + 23, reason        # the Send that would pass it
    (n, held), = result
    assert held <= limit, (n, held)
    # Every record accepted was held by the session or taken by the kernels: the
    # server's socket buffer (autotuned up to tcp_wmem's maximum) and the client's.
    with open("/proc/sys/net/ipv4/tcp_wmem") as f:
        kernel = int(f.read().split()[2]) + (64 << 10)
    assert n * 23 <= limit + kernel, (n, n * 23, kernel)
    assert any(r.levelname == "WARNING" and "send queue limit exceeded" in r.getMessage()
               for r in caplog_iocpnet.records)


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_iocpnet_client_and_server_packets_over_tls(server, backend, pki, version):
    """ClientService(ssl=) to Listener(ssl=), PacketSession on both ends: every packet
    arrives in order, OnSend counts plaintext, send_queue_bytes drains to 0."""
    events = Events()
    n_packets = 2000

    class Server(iocpnet.PacketSession):
        def OnConnected(self):
            events.add("server connected", self.tls_version, self.tls_alpn)

        def OnRecvPacket(self, pid, payload):
            self.SendPacket(pid, payload)

    class Client(iocpnet.PacketSession):
        def __init__(self):
            self.next = 0
            self.sent = 0
            self.expected = 0

        def OnConnected(self):
            events.add("client connected", self.tls_version, self.tls_alpn,
                       self.tls_peer_certificate["subject"])
            for i in range(n_packets):
                packet = iocpnet.make_packet(i % 65536, b"p" * (i % 300))
                self.expected += len(packet)
                assert self.Send(packet)

        def OnSend(self, num_bytes):
            self.sent += num_bytes

        def OnRecvPacket(self, pid, payload):
            assert pid == self.next % 65536 and payload == b"p" * (self.next % 300)
            self.next += 1
            if self.next == n_packets:
                wait_for(lambda: self.send_queue_bytes == 0, message="the queue drained")
                events.add("client done", self.sent, self.expected)
                self.Disconnect("finished")

        def OnDisconnected(self, reason):
            events.add("client disconnected", reason)

    srv = server(Server, ssl=server_context(pki, alpn=["game/1"], version=version))
    cc = ClientCore(backend)
    try:
        clients = iocpnet.ClientService(cc.core, srv.address, Client, 2,
                                        ssl=client_context(pki, alpn=["game/1"]),
                                        server_hostname="game.test")
        clients.Start()
        done = events.wait("client done", 2, timeout=30)
        assert all(sent == expected for sent, expected in done), done
        assert events.wait("client disconnected", 2) == [("finished",)] * 2
        cn = (("commonName", "localhost"),)
        assert events.of("client connected") == [(version, "game/1", (cn,))] * 2
        assert events.of("server connected") == [(version, "game/1")] * 2
        clients.Stop()
        assert clients.connect_failures == 0
    finally:
        cc.close()


def test_client_refuses_an_untrusted_server(server, backend, pki):
    events = Events()

    class Client(iocpnet.Session):
        def OnConnected(self):
            events.add("connected")

        def OnConnectFailed(self, reason):
            events.add("failed", reason)

        def OnDisconnected(self, reason):
            events.add("disconnected", reason)

    srv = server(echo_session(Events()), ssl=server_context(pki))
    cc = ClientCore(backend)
    try:
        clients = iocpnet.ClientService(cc.core, srv.address, Client, 1,
                                        ssl=client_context(pki, cafile=pki["rogue_ca"]))
        clients.Start()
        (reason,), = events.wait("disconnected")
        assert reason.startswith("TLS handshake failed: ") and \
            "certificate verify failed" in reason, reason
        assert events.of("failed") == [(reason,)]
        assert [e[0] for e in events.log] == ["failed", "disconnected"]
        wait_for(lambda: clients.connect_failures == 1, message="the failure counted")
        clients.Stop()
    finally:
        cc.close()


def test_client_sni_defaults_to_the_host_and_can_be_set(server, backend, pki):
    seen = []
    ctx = server_context(pki)
    ctx.sni_callback = lambda obj, name, c: seen.append(name)
    srv = server(echo_session(Events()), ssl=ctx)
    events = Events()

    class Client(iocpnet.Session):
        def OnConnected(self):
            events.add("connected")
            self.Disconnect("enough")

    cc = ClientCore(backend)
    try:
        for name in ("localhost", "game.test"):
            kw = {} if name == "localhost" else {"server_hostname": name}
            clients = iocpnet.ClientService(cc.core, ("localhost", srv.port), Client, 1,
                                            ssl=client_context(pki), **kw)
            assert clients.server_hostname == name
            clients.Start()
            events.wait("connected", len(seen) + 1)
            clients.Stop()
    finally:
        cc.close()
    assert seen == ["localhost", "game.test"]


# ---- the command line ----

def test_cli_echo_with_tls_and_the_dummy_client(backend, pki):
    """``echo --tls-cert --tls-key`` serves TLS (Python's client and the dummy client
    both get their echo); ``dummy-client --tls`` without the CA refuses the server
    and says why, exit 1; a key without a certificate is a one-line error, exit 2."""
    from subproc import Proc

    def cli(*args):
        return Proc.python("-m", "iocpnet", "--backend", backend, *map(str, args))

    with cli("echo", "--host", "127.0.0.1", "--port", 0, "--workers", 2,
             "--tls-cert", pki["server"], "--tls-key", pki["server_key"]) as echo:
        port = echo.port(r"echo server \(TLS\) on 127\.0\.0\.1:(\d+)")
        with tls_connect(("127.0.0.1", port), client_context(pki)) as c:
            c.sendall(b"cli over tls")
            assert recv_all(c, 12) == b"cli over tls"
        good = cli("dummy-client", "--port", port, "--host", "localhost", "--tls",
                   "--tls-ca", pki["ca"], "--clients", 10, "--seconds", 1.5,
                   "--interval", 0.5, "--size", 1000)
        assert good.wait(60) == 0, good.output
        assert "10 connected, 0 failed to connect" in good.output
        bad = cli("dummy-client", "--port", port, "--tls", "--tls-ca", pki["rogue_ca"],
                  "--clients", 2, "--seconds", 1)
        assert bad.wait(60) == 1, bad.output
        assert "TLS handshake failed: " in bad.output and \
            "certificate verify failed" in bad.output, bad.output
        echo.signal()
        assert echo.wait() == 0, echo.output
    half = cli("echo", "--port", 0, "--tls-key", pki["server_key"])
    assert half.wait() == 2
    assert "--tls-cert and --tls-key go together" in half.output
