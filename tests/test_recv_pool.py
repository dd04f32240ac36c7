"""The receive pool gives back what a spike made (port_recv_pool_trim), and only that.

A spike (hundreds of connections with 16 KiB in flight at once, the hooks held up so
that their buffers pile up) grows the pool to hundreds of buffers; once the spike has
been over for one to two recv_pool_window, the pool is back near its floor, in its
stats and in the process's resident memory.  (That a steady load keeps its buffers is
a cost, not a verdict a test can give here: a load driven from the test's thread lends a
varying number of buffers from one window to the next, and trimming after a quieter
window is the pool's job.)  Views the hooks kept (detached buffers) and the bytes
of the traffic that runs while the pool shrinks stay intact."""
import os
import socket
import threading
import time

import pytest

import iocpnet
from conftest import connect, recv_exactly

WINDOW = 0.5          # recv_pool_window of these tests, seconds
FLOOR = 8             # PORT_POOL_FLOOR


def _rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _pattern(i, n):
    return bytes((i * 7 + k) & 0xFF for k in range(251)) * (n // 251) + bytes(n % 251)


def test_a_spike_is_given_back_once_quiet(server, backend):
    hold = threading.Event()
    kept = []

    class Echo(iocpnet.Session):
        def OnRecv(self, data):
            if not hold.is_set():
                hold.wait(5)            # held up: the spike's receives pile up meanwhile
            if len(kept) < 20 and len(data) > 12 * 1024:
                kept.append((data, bytes(data)))   # a large view kept: detached
            self.Send(bytes(data))

    srv = server(Echo, accepts=64, core_kw={"recv_pool_window": WINDOW})
    n, size = 300, 16 * 1024
    clients = [connect(srv.address) for _ in range(n)]
    try:
        for i, c in enumerate(clients):
            c.sendall(_pattern(i, size))
        time.sleep(0.5)
        hold.set()
        for i, c in enumerate(clients):
            assert recv_exactly(c, size) == _pattern(i, size), f"connection {i}'s echo"
        grown = srv.core.stats()
        assert grown["recv_buffers"] >= 64, f"no spike to give back: {grown}"
        rss_spike = _rss_kib()

        # Light traffic goes on while the pool shrinks (io_uring takes buffers back
        # out of the ring its receives use): every byte must come back as sent.
        light = clients[:4]
        deadline = time.monotonic() + 2 * WINDOW + 15
        rounds = 0
        while True:
            st = srv.core.stats()
            if st["recv_buffers"] <= FLOOR + 8:
                break
            assert time.monotonic() < deadline, (
                f"the pool did not shrink within {2 * WINDOW + 15:.1f} s of the spike: "
                f"{st} (after the spike: {grown})")
            for i, c in enumerate(light):
                msg = _pattern(rounds + i, 1000 + 37 * (rounds % 300))
                c.sendall(msg)
                assert recv_exactly(c, len(msg)) == msg, "the light traffic's echo"
            rounds += 1
            time.sleep(0.01)
        st = srv.core.stats()
        assert st["recv_buffers_trimmed"] >= grown["recv_buffers"] - (FLOOR + 8), st
        assert st["recv_buffer_bytes"] == st["recv_buffers"] * 16 * 1024, st
        rss_quiet = _rss_kib()
        # Each 16 KiB block gives back its whole pages (at least 12 KiB of 16 when
        # it is not page-aligned); half of it leaves room for the process's own.
        given = (grown["recv_buffers"] - st["recv_buffers"]) * 16
        # Not under ASan (scripts/sanitize.sh): its allocator keeps what is freed in
        # quarantine and its own memory moves the RSS by more than this.
        if "libasan" not in os.environ.get("LD_PRELOAD", ""):
            assert rss_spike - rss_quiet >= given // 2, (
                f"VmRSS {rss_spike} -> {rss_quiet} KiB, {given} KiB of buffers given back")
        # What the hooks kept is theirs, untouched by the trim.
        assert kept, "no view was kept"
        for view, copy in kept:
            assert bytes(view) == copy
        # The pool grows again for the next spike.
        hold.clear()
        for i, c in enumerate(clients):
            c.sendall(_pattern(i + 1, size))
        time.sleep(0.5)
        hold.set()
        for i, c in enumerate(clients):
            assert recv_exactly(c, size) == _pattern(i + 1, size)
    finally:
        hold.set()
        for c in clients:
            c.close()
        kept.clear()


def test_recv_pool_window_is_checked(backend):
    for bad in (0.0, -1.0, float("nan"), 1e9):
        with pytest.raises(ValueError):
            iocpnet.IocpCore(backend, recv_pool_window=bad)
