"""A deliberately small WebSocket client written from RFC 6455 alone, for tests that
must send what no library would: bad frames, bad handshakes, half-sent messages.

It shares no code with iocpnet (its frames are built here byte by byte) and is the
reference the hypothesis tests compare the C parser with."""
import base64
import hashlib
import os
import socket
import random
import struct
import threading
import time

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def frame(opcode, payload=b"", fin=True, mask=True, rsv=0, key=None, length=None):
    """One frame; `length` overrides the announced length (to lie about it)."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    mbit = 0x80 if mask else 0
    if n < 126:
        head = bytes([b0, mbit | n])
    elif n < 65536:
        head = bytes([b0, mbit | 126]) + struct.pack("!H", n)
    else:
        head = bytes([b0, mbit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4) if key is None else key
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_payload(code, reason=b""):
    return struct.pack("!H", code) + reason


def accept_key(key):
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def upgrade_request(path="/", host="localhost", key=None, extra=()):
    key = key or base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
             "Sec-WebSocket-Version: 13", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), key


def read_head(sock):
    """Read an HTTP head (through the blank line); returns (status, headers, rest)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed during the HTTP head: {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, rest


class RawClient:
    """A socket that did the upgrade; reads unmasked frames from the server."""

    def __init__(self, address, path="/", extra=(), timeout=10, ssl=None):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ssl is not None:             # wss: an ssl.SSLContext for the server "localhost"
            self.sock = ssl.wrap_socket(self.sock, server_hostname="localhost")
        req, key = upgrade_request(path, extra=extra)
        self.sock.sendall(req)
        self.status, self.headers, self.buf = read_head(self.sock)
        if self.status == 101:
            assert self.headers["sec-websocket-accept"] == accept_key(key)

    def send(self, data):
        self.sock.sendall(data)

    def _need(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed with {len(self.buf)} of {n} bytes")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_frame(self):
        """(fin, opcode, payload) of the next frame (which must be unmasked)."""
        b0, b1 = self._need(2)
        assert not b1 & 0x80, "a server frame must not be masked"
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._need(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._need(8))[0]
        return bool(b0 & 0x80), b0 & 0x0F, self._need(n)

    def read_close(self):
        """Read frames up to the server's close frame: (code, reason)."""
        while True:
            fin, op, payload = self.read_frame()
            if op == 8:
                if not payload:
                    return 1005, ""
                return struct.unpack("!H", payload[:2])[0], payload[2:].decode()

    def rest_until_eof(self):
        """Every byte the server sends from here until it closes the connection."""
        out = bytearray(self.buf)
        self.buf = b""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return bytes(out)
            out += chunk

    def at_eof(self):
        """True once the server has closed the TCP connection (after its close)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except (ConnectionResetError, socket.timeout):
            return False

    def close(self):
        self.sock.close()


def close_race(address, take_session, senders=4, ssl=None):
    """One round of Close() racing SendMessage on a server session: `senders` threads
    send small binary messages until SendMessage returns False while another thread
    calls Close(1000) after a random pause; the client reads every frame, answers the
    close frame, then reads to the end of the connection.  `take_session()` returns the
    server session once the upgrade is done.

    Returns (messages SendMessage accepted, data frames before the close frame,
    the close frame's (code, reason), the bytes that followed the close frame)."""
    c = RawClient(address, ssl=ssl)
    try:
        assert c.status == 101, c.status
        s = take_session()
        accepted = [0] * senders
        start = threading.Barrier(senders + 1)

        def send(i):
            start.wait()
            payload = bytes([65 + i]) * 8
            for _ in range(20000):
                if not s.SendMessage(payload):
                    break
                accepted[i] += 1

        def close():
            start.wait()
            time.sleep(random.random() * 0.002)
            s.Close(1000, "race")

        threads = [threading.Thread(target=send, args=(i,)) for i in range(senders)]
        threads.append(threading.Thread(target=close))
        for t in threads:
            t.start()
        frames = 0
        while True:
            fin, op, payload = c.read_frame()
            if op == 8:
                code = struct.unpack("!H", payload[:2])[0]
                close = (code, payload[2:].decode())
                break
            assert fin and op == 2 and len(payload) == 8, (fin, op, payload)
            frames += 1
        c.send(frame(8, close_payload(1000)))
        trailing = c.rest_until_eof()
        for t in threads:
            t.join(10)
        del s
        return sum(accepted), frames, close, trailing
    finally:
        c.close()
