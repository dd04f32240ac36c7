"""A TLS Send that meets an allocation failure, for tests/test_resources.py.

    python tests/stress/tls_send_oom.py --backend epoll --case marks PKI_DIR

The peer completes the handshake and does not read, so every record the server makes
stays queued, with its mark (the plaintext accounting).  With the address space capped
(RLIMIT_AS, a little above what is mapped, set anew before each Send):

  marks  Sends of 2 bytes until one fails: the ring of marks (or of the send queue)
         cannot double.  Then, uncapped, one more Send, and the peer reads everything:
         it must get every message that was not refused, in order, then the last one
         (a record taken out of the BIO and not queued broke the stream: the peer failed
         the next record's MAC).
  big    one Send of 16 MiB under caps of 1.3 to 2.2 times that: OpenSSL may fail (the
         session cut: "TLS error"), or the records be made and not read out of the BIO
         (MemoryError: then the session must end, "the stream is broken"), or it goes.
         The session must never be left open after a MemoryError.

Prints one JSON line per try.  (In a subprocess: the cap must not reach the test process.)
"""
import argparse
import json
import os
import resource
import socket
import ssl
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import iocpnet  # noqa: E402
from send_copy_oom import vm_size  # noqa: E402  (this directory is sys.path[0])
from tls_certs import make_pki  # noqa: E402


class Server:
    def __init__(self, backend, sctx, cctx):
        self.result = {}
        self.sessions = []
        self.ended = threading.Event()
        outer = self

        class Quiet(iocpnet.Session):
            send_queue_limit = 1 << 31
            # The peer does not read, by design: no stall cut, however long the case
            # takes (the default 10 s cut it under a slowed loop: 'send stalled').
            send_timeout = 0

            def OnConnected(self):
                outer.sessions.append(self)

            def OnDisconnected(self, reason):
                outer.result["reason"] = reason
                outer.ended.set()

        self.core = iocpnet.IocpCore(backend)
        self.service = iocpnet.Service(self.core, iocpnet.Listener(("127.0.0.1", 0), ssl=sctx),
                                       Quiet, 4)
        self.service.Start()
        self.workers = [threading.Thread(target=self._work, daemon=True) for _ in range(2)]
        for w in self.workers:
            w.start()
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.connect(("127.0.0.1", self.service.listener.port))
        self.peer = cctx.wrap_socket(raw, server_hostname="localhost")   # and no reading
        deadline = time.monotonic() + 10
        while not self.sessions and time.monotonic() < deadline:
            time.sleep(0.01)
        self.session = self.sessions[0]

    def _work(self):
        while self.core.Dispatch() >= 0:
            pass

    def send_capped(self, data, room):
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (vm_size() + room, hard))
        try:
            return repr(self.session.Send(data))
        except MemoryError as e:
            return f"MemoryError: {e}"
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

    def stop(self):
        self.peer.close()
        self.service.Stop(2.0)
        self.core.Close(2.0)
        for w in self.workers:
            w.join(5)


def case_marks(srv):
    r = srv.result
    n = 0
    # 1.5 MiB of room: the 1 MiB arenas the messages come from fit, a ring of marks
    # doubling to 2 MiB (131072 records queued) does not: the Send ~182,700 fails (3.11
    # and 3.13t).  Bounded by count, not time: how long that takes is the machine's
    # speed (7 s on a normal build, 26 s under ASan on one CPU; the caller's timeout
    # bounds a hang), and a loop cut at 60 s failed the case on a slow machine.
    while n < 400_000:
        out = srv.send_capped((n & 0xFFFF).to_bytes(2, "little"), 1536 << 10)
        if out != "True":
            r["send"] = out
            break
        n += 1
    r["sends"] = n
    r["send_after"] = repr(srv.session.Send(b"END!"))
    srv.peer.settimeout(10)
    got = bytearray()
    try:
        while not got.endswith(b"END!"):
            d = srv.peer.recv(1 << 16)
            if not d:
                break
            got += d
    except (OSError, ssl.SSLError) as e:
        r["peer_error"] = f"{type(e).__name__}: {e}"
    want = b"".join((i & 0xFFFF).to_bytes(2, "little") for i in range(n)) + b"END!"
    r["peer_got_all"] = bytes(got) == want
    r["peer_bytes"] = len(got)
    r["want_bytes"] = len(want)
    print(json.dumps(r), flush=True)


def case_big(backend, sctx, cctx):
    size = 16 << 20
    data = b"x" * size
    for tenth in range(13, 23):
        srv = Server(backend, sctx, cctx)
        r = srv.result
        r["factor"] = tenth / 10
        r["send"] = srv.send_capped(data, size * tenth // 10)
        if r["send"] != "True":
            srv.ended.wait(5)
        r["ended"] = srv.ended.is_set()
        r["send_after"] = repr(srv.session.Send(b"y"))
        print(json.dumps(r), flush=True)
        srv.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default=None)
    ap.add_argument("--case", choices=("marks", "big"), required=True)
    ap.add_argument("pki")
    args = ap.parse_args()
    pki = make_pki(args.pki)
    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    sctx.load_cert_chain(pki["server"], pki["server_key"])
    cctx = ssl.create_default_context(cafile=pki["ca"])
    if args.case == "marks":
        srv = Server(args.backend, sctx, cctx)
        case_marks(srv)
        srv.stop()
    else:
        case_big(args.backend, sctx, cctx)


if __name__ == "__main__":
    main()
