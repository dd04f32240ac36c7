"""Dummy clients that load an echo server and measure it (used by ``demo`` and
``dummy-client``).

Each client session sends a message, waits for the whole echo, checks every byte, and
sends the next one (ping-pong).  Message contents change with every message (a counter
in the first bytes), so a stale or misrouted echo is caught.  Figures are kept per
session and summed by the reporter once a second, so the hot path takes no shared lock.
"""
import math
import struct
import threading
import time

import iocpnet

_COUNTER = struct.Struct("<Q")


class Histogram:
    """Round-trip times in log-spaced buckets (about 2 % wide), merged across sessions."""

    __slots__ = ("counts", "total", "max")
    BUCKETS_PER_OCTAVE = 32

    def __init__(self):
        self.counts = {}
        self.total = 0
        self.max = 0.0

    def add(self, seconds):
        us = seconds * 1e6
        b = int(math.log2(us) * self.BUCKETS_PER_OCTAVE) if us >= 1 else 0
        self.counts[b] = self.counts.get(b, 0) + 1
        self.total += 1
        if seconds > self.max:
            self.max = seconds

    def merge(self, other):
        for b, n in other.counts.items():
            self.counts[b] = self.counts.get(b, 0) + n
        self.total += other.total
        self.max = max(self.max, other.max)

    def percentile(self, q):
        """The q-th percentile in seconds (upper edge of its bucket), or None if empty."""
        if not self.total:
            return None
        rank = q / 100.0 * self.total
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                return min(2 ** ((b + 1) / self.BUCKETS_PER_OCTAVE) / 1e6, self.max)
        return self.max


class Stats:
    """What one client session (or a sum of them) measured."""

    __slots__ = ("messages", "bytes", "errors", "hist")

    def __init__(self):
        self.messages = 0
        self.bytes = 0
        self.errors = []
        self.hist = Histogram()

    def merge(self, other):
        self.messages += other.messages
        self.bytes += other.bytes
        self.errors.extend(other.errors)
        self.hist.merge(other.hist)


def make_client_class(size, stop_event, finished):
    """A Session class that ping-pongs `size`-byte messages until `stop_event` is set;
    each session's Stats go to `finished` (a list) when it disconnects."""
    if size < _COUNTER.size:
        size = _COUNTER.size
    pad = bytes((i * 31 + 7) & 0xFF for i in range(size - _COUNTER.size))

    class LoadClient(iocpnet.Session):
        def __init__(self):
            self.stats = Stats()
            self.counter = 0
            self.expect = b""
            self.sent_at = 0.0

        def _send_next(self):
            self.counter += 1
            self.expect = _COUNTER.pack(self.counter) + pad
            self.sent_at = time.perf_counter()
            self.Send(self.expect)

        def OnConnected(self):
            self._send_next()

        def OnRecv(self, data):
            if len(data) < size:
                return 0                          # wait for the whole echo
            now = time.perf_counter()
            st = self.stats
            if data[:size] != self.expect:
                st.errors.append(f"echo mismatch on message {self.counter} of "
                                 f"{self.address}")
                self.Disconnect("echo mismatch")
                return None
            st.messages += 1
            st.bytes += size
            st.hist.add(now - self.sent_at)
            if stop_event.is_set():
                self.Disconnect("load finished")
                return size
            self._send_next()
            return size

        def OnConnectFailed(self, reason):
            self.stats.errors.append(reason)

        def OnDisconnected(self, reason):
            if reason not in ("load finished", "client shutdown", "echo mismatch") and \
                    not stop_event.is_set():
                self.stats.errors.append(f"disconnected during the load: {reason}")
            finished.append(self.stats)

    return LoadClient


class LoadRun:
    """N ping-pong clients against `address` on `core`, with live figures."""

    def __init__(self, core, address, clients, size, out=None):
        self.core = core
        self.address = address
        self.clients = clients
        self.size = size
        self.stop_event = threading.Event()
        self.finished = []
        self.cls = make_client_class(size, self.stop_event, self.finished)
        self.service = iocpnet.ClientService(core, address, self.cls, clients)
        self.out = out

    def snapshot(self):
        total = Stats()
        for s in self.service.sessions:
            st = getattr(s, "stats", None)
            if st is not None:
                total.messages += st.messages
                total.bytes += st.bytes
        for st in list(self.finished):
            total.messages += st.messages
            total.bytes += st.bytes
        return total

    def summary(self):
        total = Stats()
        for s in self.service.sessions:
            st = getattr(s, "stats", None)
            if st is not None:
                total.merge(st)
        for st in list(self.finished):
            total.merge(st)
        return total

    def run(self, seconds, on_tick=None, server_sessions=None):
        """Start the clients, tick once a second for `seconds`, stop them; returns the
        summed Stats and the elapsed time."""
        self.service.Start()
        start = time.perf_counter()
        last_t, last = start, self.snapshot()
        next_tick = start + 1.0
        deadline = start + seconds
        while True:
            now = time.perf_counter()
            if now >= deadline:
                break
            time.sleep(max(0.0, min(next_tick, deadline) - now))
            now = time.perf_counter()
            if now >= next_tick or now >= deadline:
                cur = self.snapshot()
                if on_tick is not None:
                    dt = now - last_t
                    on_tick(now - start, (cur.messages - last.messages) / dt,
                            (cur.bytes - last.bytes) / dt)
                last_t, last = now, cur
                next_tick += 1.0
        elapsed = time.perf_counter() - start
        self.stop_event.set()
        self.service.Stop(5.0)
        return self.summary(), elapsed


def format_rate(n):
    return f"{n:,.0f}"


def format_ms(seconds):
    return "-" if seconds is None else f"{seconds * 1000:.2f} ms"
