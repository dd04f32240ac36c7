"""Thread safety of Send and Disconnect: 8 threads hammer the same sessions at once
while their peers read, close or reset.

Each thread sends its own numbered stream of records to every session; the peer parses
the byte stream and checks, per thread, that the records arrive whole and in order with
no gap.  Send's result is checked too: once it returns False (the session is closing)
it never returns True again, and on a session that ended by Disconnect every record
whose Send returned True reaches the peer (Disconnect flushes what was queued).
"""
import itertools
import random
import socket
import struct
import threading
import time

import iocpnet

from conftest import connect, recv_exactly, wait_for

THREADS = 8
RECORD = struct.Struct("<BBIH")        # magic, thread, seq, payload length
MAGIC = 0xA5


def reset_close(sock):
    """Close with an RST instead of a FIN (SO_LINGER with a zero timeout)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def record(t, seq):
    n = (seq * 7 + t * 13) % 120
    payload = bytes(((seq + t + i) & 0xFF) for i in range(n))
    return RECORD.pack(MAGIC, t, seq, n) + payload


def parse_records(data):
    """-> ({thread: [seq, ...]}, error or None, trailing partial bytes)."""
    seqs = {t: [] for t in range(THREADS)}
    pos = 0
    while len(data) - pos >= RECORD.size:
        magic, t, seq, n = RECORD.unpack_from(data, pos)
        if magic != MAGIC or t >= THREADS:
            return seqs, f"bad record header at byte {pos}", 0
        if len(data) - pos - RECORD.size < n:
            break
        if data[pos:pos + RECORD.size + n] != record(t, seq):
            return seqs, f"record {t}/{seq} corrupted at byte {pos}", 0
        seqs[t].append(seq)
        pos += RECORD.size + n
    return seqs, None, len(data) - pos


class Events:
    def __init__(self):
        self.lock = threading.Lock()
        self.serials = itertools.count()
        self.sessions = []
        self.disconnects = {}

    def session_class(self):
        ev = self

        class Target(iocpnet.Session):
            # Eight threads queue faster than one Python reader drains: keep the limit
            # out of the way (it has its own tests).
            send_queue_limit = 64 << 20

            def OnConnected(self):
                self.serial = next(ev.serials)
                with ev.lock:
                    ev.sessions.append(self)

            def OnDisconnected(self, reason):
                with ev.lock:
                    ev.disconnects.setdefault(self.serial, []).append(reason)

        return Target


def _reader(sock, mode, limit, out):
    """Read until EOF; "close" and "reset" peers stop after `limit` bytes."""
    buf = bytearray()
    sock.settimeout(30)
    try:
        while True:
            if mode != "read" and len(buf) >= limit:
                if mode == "reset":
                    reset_close(sock)
                else:
                    sock.close()
                break
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    except OSError as e:
        out["error"] = repr(e)
    out["data"] = bytes(buf)


def test_send_and_disconnect_from_8_threads_while_peers_close(server):
    ev = Events()
    srv = server(ev.session_class(), workers=2, accepts=32)
    modes = ["read", "close", "reset"] * 4              # 12 sessions
    rng = random.Random(1)
    clients = []
    for mode in modes:
        c = connect(srv.address, timeout=30)
        clients.append((c, mode, rng.randrange(20_000, 400_000), {}))
    wait_for(lambda: len(ev.sessions) == len(modes), 10, "every session")
    # Match each session to its peer by the peer's port.
    by_port = {s.address[1]: s for s in ev.sessions}
    sessions = [by_port[c.getsockname()[1]] for c, _, _, _ in clients]
    readers = [threading.Thread(target=_reader, args=(c, mode, limit, out))
               for c, mode, limit, out in clients]
    for r in readers:
        r.start()

    per_thread = 1500
    accepted = [[0] * len(sessions) for _ in range(THREADS)]   # Sends that returned True
    regressions = []
    start = threading.Barrier(THREADS)

    def hammer(t):
        start.wait()
        for seq in range(per_thread):
            rec = record(t, seq)
            for j, s in enumerate(sessions):
                ok = s.Send(rec)
                if ok:
                    if accepted[t][j] != seq:
                        regressions.append((t, j, seq))
                    accepted[t][j] = seq + 1
                # Every thread asks the "read" peers' sessions to Disconnect at about
                # the same point, each a little apart, and keeps sending after it.
                if modes[j] == "read" and seq == per_thread * (j + 1) // 16 + t:
                    s.Disconnect(f"kicked by thread {t}")

    threads = [threading.Thread(target=hammer, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not any(th.is_alive() for th in threads)
    assert not regressions, f"Send returned True after returning False: {regressions[:5]}"
    for j, s in enumerate(sessions):
        if modes[j] != "read":
            s.Disconnect("done")          # those whose peer is still reading
    for r in readers:
        r.join(30)
    assert not any(r.is_alive() for r in readers), "a peer never saw the end of its stream"
    del sessions, by_port
    wait_for(lambda: len(ev.disconnects) == len(modes), 10, "every OnDisconnected")
    time.sleep(0.1)                 # a second OnDisconnected's chance to come (checked below)
    with ev.lock:
        serials = {s.address[1]: s.serial for s in ev.sessions}
        ev.sessions.clear()

    for j, (c, mode, limit, out) in enumerate(clients):
        serial = serials[c.getsockname()[1]] if mode == "read" else None
        seqs, error, partial = parse_records(out.get("data", b""))
        assert error is None, f"peer {j} ({mode}): {error}"
        for t in range(THREADS):
            assert seqs[t] == list(range(len(seqs[t]))), (
                f"peer {j} ({mode}): thread {t}'s records out of order or with a gap: "
                f"{seqs[t][:10]}...")
            assert len(seqs[t]) <= accepted[t][j]
        if mode == "read":
            # Ended by Disconnect while the peer read everything: nothing queued is lost.
            assert "error" not in out, out.get("error")
            assert partial == 0
            for t in range(THREADS):
                assert len(seqs[t]) == accepted[t][j], (
                    f"peer {j}: thread {t} had {accepted[t][j]} records accepted by Send, "
                    f"the peer got {len(seqs[t])}")
            (reason,) = ev.disconnects[serial]
            assert reason.startswith("kicked by thread"), reason
    for serial, reasons in ev.disconnects.items():
        assert len(reasons) == 1, f"session {serial}: OnDisconnected {len(reasons)} times: {reasons}"
    for c, _, _, _ in clients:
        c.close()


def test_send_disconnect_abort_race_with_an_immediate_peer_close(server):
    """Many short sessions: the peer closes (FIN or RST) right after connecting while 8
    threads Send, Disconnect and Abort on the same session.  No crash, exactly one
    OnDisconnected each, and a Send after the session ended returns False."""
    ev = Events()
    srv = server(ev.session_class(), workers=2, accepts=32)
    rounds = 40
    late_sends = []
    for n in range(rounds):
        c = connect(srv.address)
        port = c.getsockname()[1]
        wait_for(lambda: any(s.address[1] == port for s in list(ev.sessions)), 10,
                 "the session")
        with ev.lock:
            (s,) = [x for x in ev.sessions if x.address[1] == port]
        go = threading.Barrier(THREADS + 1)

        def hammer(t):
            go.wait()
            for seq in range(200):
                s.Send(record(t, seq))
                if seq == 50 + t * 10:
                    (s.Abort if (t + n) % 3 == 0 else s.Disconnect)(f"thread {t}")

        threads = [threading.Thread(target=hammer, args=(t,)) for t in range(THREADS)]
        for th in threads:
            th.start()
        go.wait()
        (reset_close if n % 2 else socket.socket.close)(c)
        for th in threads:
            th.join(30)
        serial = s.serial
        wait_for(lambda: serial in ev.disconnects, 10, f"round {n}'s OnDisconnected")
        late_sends.append(s.Send(b"too late"))
        del s
    with ev.lock:
        ev.sessions.clear()
    time.sleep(0.1)                 # a second OnDisconnected's chance to come: none must
    assert len(ev.disconnects) == rounds
    for serial, reasons in ev.disconnects.items():
        assert len(reasons) == 1, f"session {serial}: OnDisconnected {len(reasons)} times"
    assert not any(late_sends), "Send returned True on a session that had ended"


def test_a_hook_that_blocks_does_not_stall_sessions_already_served(server):
    """Workers - 1 hooks block, one after another, each on whichever worker took it;
    a session served before they blocked (its receive armed by a worker that is now
    stuck, on io_uring the leader that keeps its place while it dispatches) goes on
    being served by the worker left, while they are all still blocked."""
    for workers in (2, 3):
        gate, inside = threading.Event(), threading.Semaphore(0)

        class Echo(iocpnet.Session):
            def OnRecv(self, data):
                d = bytes(data)
                if d == b"block":
                    inside.release()
                    gate.wait(30)
                self.Send(d)

        srv = server(Echo, workers=workers)
        try:
            blockers = [connect(srv.address) for _ in range(workers - 1)]
            other = connect(srv.address)
            for c in blockers + [other]:
                for _ in range(10):
                    c.sendall(b"warm")
                    assert recv_exactly(c, 4) == b"warm"
            for i, c in enumerate(blockers):
                c.sendall(b"block")
                assert inside.acquire(timeout=10), f"hook {i} of {workers - 1} never ran"
            for i in range(20):
                other.sendall(b"ping%02d" % i)
                assert recv_exactly(other, 6) == b"ping%02d" % i
            assert not gate.is_set()
        finally:
            gate.set()
        for c in blockers:
            assert recv_exactly(c, 5) == b"block"
            c.close()
        other.close()
