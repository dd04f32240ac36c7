"""Dummy clients that load a server and check every answer (``demo`` and
``dummy-client``).

Three protocols:

- ``echo``: each client session sends a message, waits for the whole echo, checks every
  byte, and sends the next one (ping-pong).  Contents change with every message (a
  counter in the first bytes), so a stale or misrouted echo is caught.
- ``chat`` (``iocpnet.chat_protocol``, examples/chat_server.py): clients join rooms of
  ``room_size``, wait until their room is full, and each says numbered messages, one at
  a time; the round trip is its own message coming back in the room's broadcast (so
  every round trip is heard by the whole room, however late its members connected).  Every message heard, its own and
  the others', is checked for content and order (numbers from one sender go up by one).
- ``game`` (``iocpnet.game_protocol``, examples/game_server.py): each bot logs in, joins
  room ``room-<index // room_size>``, waits until the room is full, then sends a move,
  waits for it to come back in a tick's ``S_MOVES`` (its round trip), sends the next,
  and says a numbered chat line with each move.  Each bot checks its own moves come
  back in order, once; at the end every chat line a sender saw come back must have been
  heard exactly once by every member of its room, and every bot must have seen state
  ticks at a quarter of the server's rate at least.

Figures are kept per session and summed by the reporter, so the hot path takes no
shared lock.  Any error (a connection refused, a mismatch, a session ended by the
server, an answer that never came) is recorded; the tool exits non-zero on any.
"""
from __future__ import annotations

import math
import ssl as _ssl
import struct
import threading
import time
from typing import Any, Callable, Dict, List, Optional, TextIO, Tuple, Type

import iocpnet
from iocpnet import chat_protocol as proto
from iocpnet import game_protocol as gproto

_COUNTER = struct.Struct("<Q")

PROTOCOLS = ("echo", "chat", "game")

# Reasons our own clients end with (their Disconnect, the ClientService's Stop): none
# of them is an error.  A server going away shows as "peer closed the connection".
_OUR_REASONS = ("load finished", "client shutdown")


class Histogram:
    """Round-trip times in log-spaced buckets (about 2 % wide), mergeable."""

    __slots__ = ("counts", "total", "max")
    BUCKETS_PER_OCTAVE = 32

    def __init__(self) -> None:
        self.counts: Dict[int, int] = {}
        self.total = 0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        us = seconds * 1e6
        b = int(math.log2(us) * self.BUCKETS_PER_OCTAVE) if us >= 1 else 0
        self.counts[b] = self.counts.get(b, 0) + 1
        self.total += 1
        if seconds > self.max:
            self.max = seconds

    def merge(self, other: Histogram) -> None:
        # dict(...) copies in one step: another thread may be adding to `other`.
        for b, n in dict(other.counts).items():
            self.counts[b] = self.counts.get(b, 0) + n
        self.total += other.total
        self.max = max(self.max, other.max)

    def since(self, earlier: Histogram) -> Histogram:
        """What was added after `earlier` (a previous copy of the same figures)."""
        h = Histogram()
        for b, n in self.counts.items():
            d = n - earlier.counts.get(b, 0)
            if d > 0:
                h.counts[b] = d
                h.total += d
        if h.counts:
            h.max = min(self.max, self._upper(max(h.counts)))
        return h

    def _upper(self, b: int) -> float:
        return float(2 ** ((b + 1) / self.BUCKETS_PER_OCTAVE) / 1e6)

    def percentile(self, q: float) -> Optional[float]:
        """The q-th percentile in seconds (upper edge of its bucket), or None if empty."""
        if not self.total:
            return None
        rank = q / 100.0 * self.total
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                return min(self._upper(b), self.max)
        return self.max


class Stats:
    """What one client session measured (or a sum of them)."""

    __slots__ = ("messages", "packets", "bytes", "errors", "hist", "connected", "ended")

    def __init__(self) -> None:
        self.messages = 0          # round trips completed and checked
        self.packets = 0           # messages received (chat: the others' too)
        self.bytes = 0             # bytes received
        self.errors: List[str] = []
        self.hist = Histogram()
        self.connected = False
        self.ended = False

    def add(self, other: Stats, with_hist: bool = True) -> None:
        self.messages += other.messages
        self.packets += other.packets
        self.bytes += other.bytes
        self.errors.extend(other.errors)
        if with_hist:
            self.hist.merge(other.hist)


def _ended(st: Stats, who: str, reason: str, expected: Tuple[str, ...]) -> None:
    """A load client's end: one the run did not cause (not "load finished", not a
    mismatch the client itself already counted) is an error of the run."""
    if st.connected and reason not in _OUR_REASONS and not reason.startswith(expected):
        st.errors.append(f"{who} disconnected during the load: {reason}")
    st.connected = False
    st.ended = True


class _Shared:
    """What a run's sessions share: the stop flag and the list of their Stats."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.stats: List[Stats] = []
        self.made = 0

    def register(self) -> Tuple[int, Stats]:
        st = Stats()
        with self.lock:
            index = self.made
            self.made += 1
            self.stats.append(st)
        return index, st


def make_echo_client(size: int, shared: _Shared) -> Type[iocpnet.Session]:
    """A Session class that ping-pongs `size`-byte messages until the run stops."""
    size = max(size, _COUNTER.size)
    pad = bytes((i * 31 + 7) & 0xFF for i in range(size - _COUNTER.size))
    stop = shared.stop

    class EchoLoadClient(iocpnet.Session):
        def __init__(self) -> None:
            self.index, self.stats = shared.register()
            self.counter = 0
            self.expect = b""
            self.sent_at = 0.0

        def _send_next(self) -> None:
            self.counter += 1
            self.expect = _COUNTER.pack(self.counter) + pad
            self.sent_at = time.perf_counter()
            self.Send(self.expect)

        def OnConnected(self) -> None:
            self.stats.connected = True
            self._send_next()

        def OnRecv(self, data: iocpnet.RecvView) -> Optional[int]:
            if len(data) < size:
                return 0                          # wait for the whole echo
            now = time.perf_counter()
            st = self.stats
            if data[:size] != self.expect:
                st.errors.append(f"echo mismatch on message {self.counter} of client "
                                 f"{self.index}")
                self.Disconnect("echo mismatch")
                return None
            st.messages += 1
            st.packets += 1
            st.bytes += size
            st.hist.add(now - self.sent_at)
            if len(data) > size:
                st.errors.append(f"client {self.index} received {len(data) - size} bytes "
                                 f"nobody asked for")
                self.Disconnect("unexpected bytes")
                return None
            if stop.is_set():
                self.Disconnect("load finished")
                return size
            self._send_next()
            return size

        def OnConnectFailed(self, reason: str) -> None:
            self.stats.errors.append(f"client {self.index}: {reason}")

        def OnDisconnected(self, reason: str) -> None:
            _ended(self.stats, f"client {self.index}", reason,
                   ("echo mismatch", "unexpected bytes"))

        def pending(self) -> Optional[str]:
            return f"message {self.counter}" if self.stats.connected else None

    return EchoLoadClient


def make_ws_echo_client(size: int, shared: _Shared) -> Type[iocpnet.Session]:
    """The echo client over WebSocket: each round trip is one binary message, checked
    whole (a WebSocket echo server sends each message back with its type)."""
    base = make_echo_client(size, shared)

    class WsEchoLoadClient(iocpnet.WebSocketSession):
        ping_interval = 0             # a load run is never idle
        __init__ = base.__init__      # type: ignore[assignment]
        _send_next = base._send_next
        OnConnected = base.OnConnected
        OnConnectFailed = base.OnConnectFailed
        OnDisconnected = base.OnDisconnected
        pending = base.pending

        def OnMessage(self, data: object, binary: bool) -> None:
            now = time.perf_counter()
            st = self.stats
            if not binary or data != self.expect:
                st.errors.append(f"echo mismatch on message {self.counter} of client "
                                 f"{self.index}")
                self.Disconnect("echo mismatch")
                return
            st.messages += 1
            st.packets += 1
            st.bytes += len(self.expect)
            st.hist.add(now - self.sent_at)
            if stop.is_set():
                self.Disconnect("load finished")
                return
            self._send_next()

    stop = shared.stop
    return WsEchoLoadClient


def chat_text(seq: int, size: int) -> str:
    """Message `seq` of a chat load client: its number, then filler up to `size` bytes."""
    head = f"{seq:010d}|"
    fill = "abcdefghijklmnopqrstuvwxyz0123456789"[seq % 36] * max(0, size - len(head))
    return head + fill


def make_chat_client(size: int, clients: int, room_size: int,
                     shared: _Shared) -> Type[iocpnet.PacketSession]:
    """A PacketSession class that joins room ``load-<index // room_size>``, waits for
    the room to be full, and says numbered messages, each after its previous one came
    back, until the run stops."""
    size = max(size, 11)
    stop = shared.stop
    room_size = max(1, room_size)

    class ChatLoadClient(iocpnet.PacketSession):
        def __init__(self) -> None:
            self.index, self.stats = shared.register()
            self.room = f"load-{self.index // room_size}"
            first = self.index - self.index % room_size
            self.room_members = min(room_size, clients - first)
            self.members: set = set()
            self.started = False
            self.nick = ""
            self.counter = 0
            self.expect = ""
            self.sent_at = 0.0
            self.joined = False
            self.last_seen: Dict[str, int] = {}

        def _fail(self, what: str) -> None:
            self.stats.errors.append(f"client {self.index} ({self.nick}): {what}")
            self.Disconnect("chat mismatch")

        def _say_next(self) -> None:
            self.counter += 1
            self.expect = chat_text(self.counter, size)
            self.sent_at = time.perf_counter()
            self.Send(proto.say(self.room, self.expect))

        def OnConnected(self) -> None:
            self.stats.connected = True

        def _maybe_start(self) -> None:
            # (on this session's strand, as every hook: no lock)
            if self.joined and not self.started and not stop.is_set() and \
                    len(self.members) >= self.room_members:
                self.started = True
                self._say_next()

        def idle_at_stop(self) -> bool:
            """Never started (its room never filled): nothing to finish."""
            return not self.started

        def OnRecvPacket(self, packet_id: int, payload: bytes) -> None:
            st = self.stats
            if packet_id == proto.S_SAID:
                now = time.perf_counter()
                r = proto.Reader(payload)
                room, nick, text = r.str8(), r.str8(), r.text()
                st.packets += 1
                st.bytes += len(payload) + iocpnet.PACKET_HEADER_SIZE
                if room != self.room:
                    self._fail(f"a message for room {room!r} in {self.room!r}")
                    return
                if nick == self.nick:
                    if text != self.expect:
                        self._fail(f"own message {self.counter} came back as "
                                   f"{text[:24]!r}...")
                        return
                    st.messages += 1
                    st.hist.add(now - self.sent_at)
                    if stop.is_set():
                        self.Disconnect("load finished")
                    else:
                        self._say_next()
                    return
                try:
                    seq = int(text[:10])
                except ValueError:
                    self._fail(f"unnumbered message from {nick}: {text[:24]!r}")
                    return
                last = self.last_seen.get(nick)
                if last is not None and seq != last + 1:
                    self._fail(f"message {seq} from {nick} after {last}")
                    return
                if text != chat_text(seq, size):
                    self._fail(f"message {seq} from {nick} has wrong content")
                    return
                self.last_seen[nick] = seq
            elif packet_id == proto.S_WELCOME:
                self.nick = proto.Reader(payload).str8()
                self.Send(proto.join(self.room))
            elif packet_id == proto.S_WHO:
                if not self.joined:
                    # the answer to our join: who is there; talk once the room is full
                    r = proto.Reader(payload)
                    if r.str8() == self.room:
                        self.joined = True
                        self.members.update(r.str8() for _ in range(r.u16()))
                        self._maybe_start()
            elif packet_id == proto.S_JOINED:
                r = proto.Reader(payload)
                if r.str8() == self.room:
                    self.members.add(r.str8())
                    self._maybe_start()
            elif packet_id == proto.S_ERROR:
                self._fail(f"the server said: {proto.Reader(payload).text()}")
            elif packet_id not in (proto.S_LEFT, proto.S_NICK):
                self._fail(f"unexpected packet id {packet_id}")

        def OnConnectFailed(self, reason: str) -> None:
            self.stats.errors.append(f"client {self.index}: {reason}")

        def OnDisconnected(self, reason: str) -> None:
            _ended(self.stats, f"client {self.index} ({self.nick})", reason, ("chat mismatch",))

        def pending(self) -> Optional[str]:
            if not self.stats.connected:
                return None
            if not self.joined:
                return "joining its room"
            if not self.started:
                return None if stop.is_set() else "its room to fill"
            return f"message {self.counter}"

    return ChatLoadClient


def make_game_client(clients: int, room_size: int, shared: _Shared,
                     bots: List[Any]) -> Type[iocpnet.PacketSession]:
    """A PacketSession class for the game example: see the module's docstring."""
    stop = shared.stop
    room_size = max(1, room_size)

    class GameLoadClient(iocpnet.PacketSession):
        def __init__(self) -> None:
            self.index, self.stats = shared.register()
            first = self.index - self.index % room_size
            self.room = f"room-{self.index // room_size}"
            self.room_members = min(room_size, clients - first)
            self.name = f"bot{self.index}"
            self.pid = 0
            self.tick_hz = 0
            self.members: set = set()
            self.started = False
            self.move_seq = 0          # the move in flight (0: none)
            self.moved = 0             # moves that came back
            self.sent_at = 0.0
            self.chat_seq = 0
            self.chat_waiting = False
            self.heard: Dict[Tuple[int, int], int] = {}
            self.confirmed: List[Tuple[int, int]] = []
            self.ticks = 0
            self.first_tick = 0.0
            self.last_tick = 0.0
            self.failed = False
            with shared.lock:
                bots.append(self)

        def _fail(self, what: str) -> None:
            if not self.failed:
                self.failed = True
                self.stats.errors.append(f"bot {self.index} ({self.room}): {what}")
            self.Disconnect("game mismatch")

        def OnConnected(self) -> None:
            self.stats.connected = True
            self.Send(iocpnet.make_packet(gproto.C_LOGIN, gproto.login(self.name, self.room)))

        def _maybe_start(self) -> None:
            if not self.started and self.pid and len(self.members) >= self.room_members:
                self.started = True
                self._next()

        def _next(self) -> None:
            if stop.is_set():
                return
            self.move_seq = self.moved + 1
            self.sent_at = time.perf_counter()
            self.Send(iocpnet.make_packet(gproto.C_MOVE, gproto.move(
                self.move_seq, 1 + self.index % 3, -1)))
            if not self.chat_waiting:
                self.chat_seq += 1
                self.chat_waiting = True
                self.Send(iocpnet.make_packet(gproto.C_CHAT, gproto.chat(
                    self.chat_seq, f"{self.name} says {self.chat_seq}")))

        def OnRecvPacket(self, packet_id: int, payload: bytes) -> None:
            st = self.stats
            st.packets += 1
            st.bytes += len(payload) + iocpnet.PACKET_HEADER_SIZE
            try:
                self._packet(packet_id, payload)
            except gproto.ProtocolError as e:
                self._fail(f"bad packet {packet_id}: {e}")

        def _packet(self, packet_id: int, payload: bytes) -> None:
            if packet_id == gproto.S_STATE:
                now = time.perf_counter()
                if not self.ticks:
                    self.first_tick = now
                self.ticks += 1
                self.last_tick = now
            elif packet_id == gproto.S_MOVES:
                _, applied = gproto.parse_moves(payload)
                for pid, seq, _x, _y in applied:
                    if pid != self.pid:
                        continue
                    if seq != self.move_seq:
                        self._fail(f"move {seq} came back, expected {self.move_seq}")
                        return
                    self.stats.messages += 1
                    self.stats.hist.add(time.perf_counter() - self.sent_at)
                    self.moved = seq
                    self.move_seq = 0
                    self._next()
            elif packet_id == gproto.S_CHAT:
                pid, seq, text = gproto.parse_chat_heard(payload)
                key = (pid, seq)
                n = self.heard[key] = self.heard.get(key, 0) + 1
                if n > 1:
                    self._fail(f"heard chat {seq} of player {pid} {n} times")
                elif pid == self.pid:
                    if seq != self.chat_seq or text != f"{self.name} says {seq}":
                        self._fail(f"own chat {seq} came back as {text!r}")
                        return
                    self.chat_waiting = False
                    self.confirmed.append(key)
            elif packet_id == gproto.S_WELCOME:
                self.pid, _level, self.tick_hz, _room = gproto.parse_welcome(payload)
                self.members.add(self.pid)
            elif packet_id == gproto.S_ROSTER:
                self.members.update(gproto.parse_roster(payload))
                self._maybe_start()
            elif packet_id == gproto.S_JOINED:
                self.members.add(gproto.parse_joined(payload)[0])
                self._maybe_start()
            elif packet_id == gproto.S_LEFT:
                if not stop.is_set():
                    self._fail("a member of the room left during the run")
            elif packet_id == gproto.S_ERROR:
                self._fail(f"the server said: {payload.decode('utf-8', 'replace')}")
            else:
                self._fail(f"unexpected packet id {packet_id}")

        def OnConnectFailed(self, reason: str) -> None:
            self.stats.errors.append(f"bot {self.index}: {reason}")

        def OnDisconnected(self, reason: str) -> None:
            _ended(self.stats, f"bot {self.index} ({self.room})", reason, ("game mismatch",))

        def pending(self) -> Optional[str]:
            if not self.stats.connected:
                return None
            if not self.pid:
                return "login"                  # not even welcomed
            if not self.started:
                return "waiting for its room to fill"
            if self.move_seq:
                return f"move {self.move_seq}"
            if self.chat_waiting:
                return f"chat {self.chat_seq}"
            return None

    return GameLoadClient


def check_game(bots: List[Any], elapsed: float) -> Tuple[List[str], List[str]]:
    """After a game run: every confirmed chat line heard once by every member of its
    room; state ticks at a quarter of the server's rate at least.  Returns (errors,
    summary lines)."""
    errors: List[str] = []
    rooms: Dict[str, List[Any]] = {}
    for b in bots:
        if b.stats.connected and not b.failed:
            rooms.setdefault(b.room, []).append(b)
    chats = 0
    for room, members in sorted(rooms.items()):
        said = [k for b in members for k in b.confirmed]
        chats += len(said)
        for b in members:
            missing = [k for k in said if b.heard.get(k) != 1]
            if missing:
                errors.append(f"bot {b.index} ({room}) did not hear {len(missing)} chat "
                              f"line(s) once, e.g. player {missing[0][0]}'s "
                              f"#{missing[0][1]}")
    rates = []
    for b in bots:
        if not b.stats.connected or b.failed:
            continue
        span = b.last_tick - b.first_tick
        rate = (b.ticks - 1) / span if b.ticks > 1 and span > 0 else 0.0
        rates.append(rate)
        if b.tick_hz and elapsed >= 2 and rate < b.tick_hz / 4:
            errors.append(f"bot {b.index} ({b.room}): {rate:.1f} state ticks/s, the "
                          f"server ticks at {b.tick_hz} Hz")
    lines = [
        f"  rooms        {len(rooms)} ({sum(len(m) for m in rooms.values())} bots); "
        f"{chats:,} chat lines, each heard once by every member of its room",
        f"  state ticks  {min(rates) if rates else 0:.1f}-{max(rates) if rates else 0:.1f}"
        f" per second per bot",
    ]
    return errors, lines


class Tick:
    """The figures of one reporting interval."""

    __slots__ = ("elapsed", "sessions", "packets_per_s", "bytes_per_s", "p50", "p99",
                 "errors")

    def __init__(self, elapsed: float, sessions: int, packets_per_s: float,
                 bytes_per_s: float, p50: Optional[float], p99: Optional[float],
                 errors: int) -> None:
        self.elapsed = elapsed
        self.sessions = sessions
        self.packets_per_s = packets_per_s
        self.bytes_per_s = bytes_per_s
        self.p50 = p50
        self.p99 = p99
        self.errors = errors


class LoadRun:
    """N checking clients against `address` on `core`, with figures every interval."""

    def __init__(self, core: iocpnet.IocpCore, address: Tuple[str, int], clients: int,
                 size: int, protocol: str = "echo", room_size: int = 10,
                 websocket: bool = False, ssl: Optional[_ssl.SSLContext] = None) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
        if protocol == "chat" and size > proto.MAX_TEXT_BYTES:
            raise ValueError(f"chat messages are at most {proto.MAX_TEXT_BYTES} bytes")
        self.bots: List[Any] = []
        self.extra_summary: List[str] = []
        self.core = core
        self.address = address
        self.clients = clients
        self.size = size
        self.protocol = protocol
        self.shared = _Shared()
        cls: Callable[[], iocpnet.Session]
        if protocol == "chat":
            cls = make_chat_client(size, clients, room_size, self.shared)
        elif protocol == "game":
            cls = make_game_client(clients, room_size, self.shared, self.bots)
        elif websocket:
            cls = make_ws_echo_client(size, self.shared)
        else:
            cls = make_echo_client(size, self.shared)
        # Over WebSocket the chat client is unchanged: its packets go in binary messages.
        target: object = address
        if websocket:
            host = f"[{address[0]}]" if ":" in address[0] else address[0]
            scheme = "wss" if ssl is not None else "ws"
            target = f"{scheme}://{host}:{address[1]}/"
        self.service = iocpnet.ClientService(core, target, cls, clients,  # type: ignore[arg-type]
                                             ssl=ssl)
        self.errors: List[str] = []        # the run's own findings (stalls)

    def snapshot(self) -> Tuple[Stats, int]:
        """Summed figures so far (histograms too), and the sessions connected now."""
        total = Stats()
        connected = 0
        with self.shared.lock:
            stats = list(self.shared.stats)
        for st in stats:
            total.add(st)
            connected += st.connected
        total.errors.extend(self.errors)
        return total, connected

    def run(self, seconds: float, on_tick: Optional[Callable[[Tick], None]] = None,
            interval: float = 1.0, grace: float = 3.0) -> Tuple[Stats, float]:
        """Start the clients, report every `interval` for `seconds`, then stop them: each
        finishes the round trip it is in (up to `grace` seconds; one that does not is an
        error).  Returns the summed Stats and the elapsed time."""
        self.service.Start()
        start = time.perf_counter()
        last_t = start
        last, _ = self.snapshot()
        next_tick = start + interval
        deadline = start + seconds
        while True:
            now = time.perf_counter()
            if now >= deadline:
                break
            if not self.service.session_count:
                break            # every client has ended (refused, or dropped): no load
            time.sleep(max(0.0, min(next_tick, deadline, now + 0.1) - now))
            now = time.perf_counter()
            if now >= next_tick or now >= deadline:
                cur, connected = self.snapshot()
                if on_tick is not None:
                    dt = max(now - last_t, 1e-9)
                    h = cur.hist.since(last.hist)
                    on_tick(Tick(now - start, connected, (cur.packets - last.packets) / dt,
                                 (cur.bytes - last.bytes) / dt, h.percentile(50),
                                 h.percentile(99), len(cur.errors)))
                last_t, last = now, cur
                while next_tick <= now:
                    next_tick += interval
        elapsed = time.perf_counter() - start
        self.shared.stop.set()
        # A chat client whose room never filled (a member could not connect) has no
        # round trip to finish: it leaves now.
        for s in self.service.sessions:
            idle = getattr(s, "idle_at_stop", None)
            if idle is not None and idle():
                s.Disconnect("load finished")
        # Let every client finish the round trip it is in and leave by itself, so that
        # no answer is cut off (which a server sees as a reset); one that gets no answer
        # within the grace time is an error.  Game bots stay until all are done and the
        # last chat lines had time to reach every member, then the run checks them.
        wait_until = time.monotonic() + grace
        if self.protocol == "game":
            while time.monotonic() < wait_until and any(
                    s.pending() is not None for s in self.service.sessions):
                time.sleep(0.01)
            time.sleep(0.3)
            errors, self.extra_summary = check_game(self.bots, elapsed)
            self.errors.extend(errors)
        while self.protocol != "game" and self.service.session_count and \
                time.monotonic() < wait_until:
            time.sleep(0.01)
        for s in self.service.sessions:
            pending = getattr(s, "pending", None)
            what = pending() if pending is not None else None
            if what is not None:
                self.errors.append(f"client {getattr(s, 'index', '?')}: no answer to its "
                                   f"{what} within {grace:g} s of the end")
            st = getattr(s, "stats", None)
            if what is None and st is not None and not st.connected and not st.ended:
                # Still connecting, or its WebSocket handshake never finished.
                self.errors.append(f"client {getattr(s, 'index', '?')}: never came up "
                                   f"(connection or handshake unfinished at the end)")
        self.service.Stop(5.0)
        total, _ = self.snapshot()
        return total, elapsed


def format_rate(n: float) -> str:
    return f"{n:,.0f}"


def format_ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f} ms"


class Progress:
    """Prints ticks: on a terminal one line rewritten in place (``\\r``), otherwise one
    line per interval."""

    def __init__(self, seconds: float, out: TextIO, sessions_of: Optional[
            Callable[[], int]] = None) -> None:
        self.seconds = seconds
        self.out = out
        self.tty = hasattr(out, "isatty") and out.isatty()
        self.sessions_of = sessions_of
        self.width = 0

    def __call__(self, t: Tick) -> None:
        sessions = self.sessions_of() if self.sessions_of is not None else t.sessions
        line = (f"[{t.elapsed:6.1f}/{self.seconds:g} s] sessions {sessions:5d} | "
                f"{format_rate(t.packets_per_s):>9} packets/s | "
                f"{t.bytes_per_s / 1e6:7.2f} MB/s | "
                f"rtt p50 {format_ms(t.p50)} p99 {format_ms(t.p99)} | errors {t.errors}")
        if self.tty:
            self.out.write("\r" + line.ljust(self.width))
            self.width = len(line)
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def done(self) -> None:
        if self.tty and self.width:
            self.out.write("\n")
            self.out.flush()


def summarize(total: Stats, elapsed: float, run: LoadRun, out: TextIO) -> None:
    failed = run.service.connect_failures
    lines = [
        "-" * 78,
        f"summary: {run.clients} {run.protocol} clients x {run.size} B messages -> "
        f"{run.address[0]}:{run.address[1]} for {elapsed:.1f} s ({run.core.backend})",
        f"  sessions     {run.clients - failed} connected, {failed} failed to connect",
        f"  round trips  {total.messages:,} checked "
        f"({format_rate(total.messages / elapsed)}/s)",
        f"  packets      {total.packets:,} received "
        f"({format_rate(total.packets / elapsed)}/s)",
        f"  bytes        {total.bytes / 1e6:,.1f} MB received "
        f"({total.bytes / elapsed / 1e6:.2f} MB/s)",
        f"  round trip   p50 {format_ms(total.hist.percentile(50))}, "
        f"p99 {format_ms(total.hist.percentile(99))}, "
        f"max {format_ms(total.hist.max if total.hist.total else None)}",
    ]
    lines.extend(run.extra_summary)
    lines += [
        f"  errors       {len(total.errors)}",
    ]
    for e in total.errors[:10]:
        lines.append(f"    {e}")
    if len(total.errors) > 10:
        lines.append(f"    ... and {len(total.errors) - 10} more")
    out.write("\n".join(lines) + "\n")
    out.flush()
