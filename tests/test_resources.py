"""Resources: accept starved of descriptors (EMFILE), churn without leaks, and a
graceful shutdown under load.  Each server runs in a subprocess (tests/stress/), so that
its descriptor limit, memory and exit status are its own.

The long churn (100,000 cycles) is `python tests/stress/churn.py`; here it runs with
IOCPNET_CHURN_CYCLES cycles (default 3000).
"""
import asyncio
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import connect, recv_exactly

STRESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stress")
CHURN_CYCLES = int(os.environ.get("IOCPNET_CHURN_CYCLES", "3000"))


def cpu_seconds(pid):
    """User + system CPU time of a process so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Subprocess:
    """A server script in a subprocess: its first stdout line is JSON (the port...)."""

    def __init__(self, script, *args):
        self.p = subprocess.Popen([sys.executable, os.path.join(STRESS, script), *args],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        if not line:
            self.p.kill()
            raise AssertionError(f"{script} did not start: {self.p.stderr.read()[-3000:]}")
        self.info = json.loads(line)

    def stop(self, timeout=30):
        """Say "stop", wait for the exit; returns (exit status, last JSON line, stderr)."""
        try:
            out, err = self.p.communicate("stop\n", timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            out, err = self.p.communicate()
            raise AssertionError(f"the server did not exit within {timeout} s after stop; "
                                 f"stderr: {err[-3000:]}")
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        return self.p.returncode, (json.loads(lines[-1]) if lines else None), err

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.communicate()


def _ping_all(socks):
    for c in socks:
        c.sendall(b"ping")


def _collect_echoes(socks, timeout, quiet=None, on_echo=None):
    """Wait for the 4-byte echo of each socket's ping; returns the set of those that got
    it.  Stops after `timeout` s, once every socket has its echo, or when nothing new
    came for `quiet` s."""
    got = {c: 0 for c in socks}
    done = set()
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    while len(done) < len(socks):
        now = time.monotonic()
        if now >= deadline or (quiet is not None and now - last >= quiet):
            break
        ready, _, _ = select.select([c for c in socks if c not in done], [], [], 0.05)
        for c in ready:
            data = c.recv(16)
            if not data:
                raise AssertionError("a waiting connection was closed by the server")
            got[c] += len(data)
            if got[c] >= 4:
                done.add(c)
                last = time.monotonic()
                if on_echo is not None:
                    on_echo(c)
    return done


# ---------------------------------------------------------------------------------------
# Accept without descriptors

def test_accept_starved_of_descriptors_backs_off_and_recovers(backend):
    """RLIMIT_NOFILE leaves room for about 8 connections; 20 connect.  The server logs
    EMFILE, pauses its accepts instead of spinning (its CPU time over a 2 s starved
    window is bounded), and serves the waiting connections once descriptors free up."""
    srv = Subprocess("fd_limited_server.py", "--backend", backend, "--headroom", "8")
    try:
        port = srv.info["port"]
        clients = [connect(("127.0.0.1", port)) for _ in range(20)]   # the backlog holds them
        _ping_all(clients)
        served = _collect_echoes(clients, 5, quiet=1.0)
        waiting = [c for c in clients if c not in served]
        assert served and len(served) <= 8, f"{len(served)} served with room for 8 descriptors"
        assert len(waiting) >= 12

        # Starved: accepts fail with EMFILE while the backlog is not empty.
        cpu0, t0 = cpu_seconds(srv.info["pid"]), time.monotonic()
        late = _collect_echoes(waiting, 2.0)
        cpu = cpu_seconds(srv.info["pid"]) - cpu0
        window = time.monotonic() - t0
        print(f"starved window: {cpu:.3f} s CPU in {window:.2f} s")
        assert not late, "served a connection with no descriptor left"
        assert cpu < 0.25 * window, (
            f"the starved server used {cpu:.2f} s of CPU in {window:.1f} s (bound: a "
            f"quarter of one core; spinning on EMFILE would use a whole core)")

        # Free descriptors: the waiting connections are accepted and served, each one
        # closed once served to make room for the next (accepts resume within the
        # back-off, at most 1 s).
        for c in served:
            c.close()
        recovered = _collect_echoes(waiting, 15, on_echo=lambda c: c.close())
        assert len(recovered) == len(waiting), (
            f"{len(waiting) - len(recovered)} connection(s) never served after "
            f"descriptors were freed")
        for c in clients:
            c.close()
        rc, final, err = srv.stop()
    finally:
        srv.kill()
    assert rc == 0, err[-3000:]
    assert "too many open files" in err and "pausing accepts" in err, err[-3000:]
    assert final["accept_errors"] >= 1 and final["accepted"] == 20, final
    assert final["in_flight"] == 0 and final["workers_alive"] == 0, final


# ---------------------------------------------------------------------------------------
# Churn

def test_churn_without_leaks(backend):
    """Connect / one round trip / disconnect, CHURN_CYCLES times (the 100,000-cycle run
    is tests/stress/churn.py's default): RSS stays within 8 MiB of its post-warm-up
    value, counters and in-flight operations return to zero, no Session object is
    left."""
    p = subprocess.run([sys.executable, os.path.join(STRESS, "churn.py"), "--backend",
                        backend, "--cycles", str(CHURN_CYCLES), "--warmup",
                        str(max(CHURN_CYCLES // 3, 500)), "--json"],
                       capture_output=True, text=True, timeout=300)
    print(p.stdout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    figures = json.loads(p.stdout.strip().splitlines()[-1])
    assert not figures["failures"]
    assert figures["connected"] == figures["disconnected"] == CHURN_CYCLES + figures["warmup"]
    if figures["rss_checked"]:           # not under ASan (its quarantine holds memory)
        assert figures["rss_growth_mb"] <= 8.0
    assert figures["in_flight_after_close"] == 0
    assert not any(figures["debug_counters"].values())
    assert figures["session_objects_left"] == 0


# ---------------------------------------------------------------------------------------
# Shutdown under load

WINDOW = 256 * 1024     # what a client of the shutdown under load has in flight at most


def test_stop_under_load_with_timers_and_jobs_pending(backend):
    """Stop() while 200 clients stream data through the echo and timers and jobs are
    pending: the server process ends every worker, runs OnDisconnected once per
    session, leaves nothing in flight and exits 0; each client sees its stream end
    (EOF or reset) after an intact prefix of its echo."""
    srv = Subprocess("shutdown_server.py", "--backend", backend, "--workers", "4")
    port = srv.info["port"]
    n_clients = 200
    results = []
    started = threading.Event()
    # What a failure to get going says: how far the clients got (which leg stalled).
    progress = {"connected": 0, "echoed to": 0, "bytes sent": 0, "bytes echoed": 0}

    async def client(i, up):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        progress["connected"] += 1
        chunk = bytes((i + k) & 0xFF for k in range(256)) * 64         # 16 KiB
        stream = chunk * 5              # the echo at any offset, for a read of 64 KiB
        sent = got = 0
        intact = True
        # At most WINDOW bytes sent and not echoed yet.  Without a bound, a sender whose
        # socket never fills (the server reads as fast as it writes) never yields: each
        # sent ~10 MB before the next got a turn, ~2 GB before any echo was read, and on
        # a loaded machine or under ASan none had its 16 KiB back within 60 s.
        room = asyncio.Event()
        room.set()

        async def send():
            nonlocal sent
            try:
                while True:
                    await room.wait()
                    writer.write(chunk)
                    sent += len(chunk)
                    if sent - got >= WINDOW:
                        room.clear()
                    await writer.drain()
                    progress["bytes sent"] += len(chunk)
            except (ConnectionError, OSError):
                pass

        sender = asyncio.ensure_future(send())
        end = "eof"
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                progress["echoed to"] += not got
                progress["bytes echoed"] += len(data)
                off = got % len(chunk)
                intact = intact and data == stream[off:off + len(data)]
                got += len(data)
                intact = intact and got <= sent
                if sent - got < WINDOW:
                    room.set()
                if got >= 16384:
                    up()
        except (ConnectionError, OSError):
            end = "reset"
        up()
        sender.cancel()
        try:
            await sender
        except asyncio.CancelledError:
            pass
        writer.close()
        results.append((i, end, got, intact))

    flowing = set()

    def run_clients():
        async def main():
            def up_for(i):
                def up():
                    flowing.add(i)
                    if len(flowing) == n_clients:
                        started.set()
                return up

            await asyncio.wait_for(
                asyncio.gather(*(client(i, up_for(i)) for i in range(n_clients))), 60)

        asyncio.run(main())

    t = threading.Thread(target=run_clients, daemon=True)
    try:
        t.start()
        if not started.wait(60):
            alive = srv.p.poll() is None
            if alive:
                srv.p.kill()
            err = srv.p.communicate(timeout=30)[1]
            raise AssertionError(
                f"only {len(flowing)} of the {n_clients} clients got data flowing within "
                f"60 s: {progress}; ended so far: {results[:5]}; the server "
                f"{'was running' if alive else f'had exited ({srv.p.returncode})'}, "
                f"its stderr: {err[-3000:]!r}")
        time.sleep(0.3)
        rc, final, err = srv.stop(timeout=30)
        t.join(30)
    finally:
        srv.kill()
    assert not t.is_alive(), "some clients never saw their connection end"
    assert rc == 0, f"exit status {rc}; {final}; stderr: {err[-3000:]}"
    print(final)
    assert final["problems"] == [], final
    assert final["sessions_at_stop"] == n_clients, final
    assert final["connected"] == final["disconnected"] == n_clients, final
    assert final["workers_alive"] == [] and final["in_flight"] == 0, final
    assert final["jobs"]["posted"] > 0 and final["jobs"]["ran"] == final["jobs"]["posted"]
    assert set(final["reasons"]) <= {
        "server shutdown", "server shutdown (its queued data was not flushed in time)",
        "peer closed the connection", "connection reset by peer", "broken pipe"}, final
    assert len(results) == n_clients
    corrupt = [r for r in results if not r[3]]
    assert not corrupt, f"echo not a prefix of what was sent: {corrupt[:5]}"


def test_close_ends_a_session_still_flushing_at_its_flush_timeout(backend):
    """Stop(1.0) gives up before a session's 2 s flush_timeout, to a peer that never
    reads; Close(5.0) must still end that session when its flush deadline passes: one
    OnDisconnected, nothing in flight, and Close returns well before its own 5 s."""
    p = subprocess.run([sys.executable, os.path.join(STRESS, "close_while_flushing.py"),
                        "--backend", backend], capture_output=True, text=True, timeout=60)
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(result["reasons"]) == 1, result
    assert result["reasons"][0].startswith("server shutdown"), result
    assert result["in_flight"] == 0, result
    assert not any(result["debug_counters"].values()), result
    assert result["close_seconds"] < 4.5, result
    assert p.returncode == 0, p.stderr[-3000:]


def test_send_out_of_memory_copying_its_rest_leaves_the_session_unlocked(backend):
    """Send(a buffer that is not bytes) to a peer that does not read: the socket takes
    part, the rest is copied to be queued, and with the address space capped the copy
    fails. Send raises MemoryError (the caller's error), the session's lock is not left
    held (a Disconnect from another thread returns: it spun for ever, holding the GIL),
    and the session ends with a reason that says why: part of the message went, the
    stream is broken."""
    p, lines, err = _stress_json(["send_copy_oom.py", "--backend", backend], 30,
                                 "hung after the failed Send (a lock left held?)")
    assert lines, err[-3000:]
    assert lines[0]["send"].startswith("MemoryError"), lines
    assert len(lines) == 2, f"hung after the failed Send (a lock left held?): {lines}"
    result = lines[-1]
    assert result["disconnect_returned"] and result["ended"], result
    assert "out of memory" in result["reason"], result
    assert "the stream is broken" in result["reason"], result
    assert result["send_after"] == "False", result
    assert p.returncode == 0, err[-3000:]


def _stress_json(argv, timeout, hung):
    """Run tests/stress/argv[0] with argv[1:]: (the process, its JSON lines, its
    stderr); killed after `timeout` s, which fails with `hung` and what it printed."""
    p = subprocess.Popen([sys.executable, os.path.join(STRESS, argv[0])] + argv[1:],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"{hung}: {out!r}")
    return p, [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")], err


def _tls_send_oom(backend, case, tmp_path):
    p, lines, err = _stress_json(["tls_send_oom.py", "--backend", backend, "--case", case,
                                  str(tmp_path)], 240, f"the {case} case did not end")
    assert lines and p.returncode == 0, err[-3000:]
    return lines


def test_tls_send_out_of_memory_loses_no_record(backend, tmp_path):
    """TLS: a Send whose records cannot be accounted for or queued (no memory to grow
    the ring of marks or the send queue) raises MemoryError before the SSLObject takes
    its data, so the stream stays whole: the peer, reading at last, gets every other
    message in order. (The ring used to grow after the records were taken out of the
    BIO: that record was lost, and the peer failed the next one's MAC.)"""
    (r,) = _tls_send_oom(backend, "marks", tmp_path)
    assert r.get("send", "").startswith("MemoryError"), f"no Send failed: {r}"
    assert r["sends"] > 1000, r
    assert r["send_after"] == "True", r
    assert r["peer_got_all"], r


def test_tls_send_out_of_memory_after_encrypting_ends_the_session(backend, tmp_path):
    """TLS: a large Send under capped memory either goes, or fails in OpenSSL (the
    session cut, "TLS error"), or its records are made and cannot be read out of the
    BIO: then Send raises MemoryError and the session ends, "the stream is broken"
    (its data is in the stream the caller was told failed). Never MemoryError with the
    session left open."""
    for r in _tls_send_oom(backend, "big", tmp_path):
        if r["send"].startswith("MemoryError"):
            assert r["ended"] and "the stream is broken" in r["reason"], r
            assert r["send_after"] == "False", r
        elif r["send"] == "False":
            assert r["reason"].startswith("TLS error"), r
        else:
            assert r["send"] == "True" and r["send_after"] == "True", r
