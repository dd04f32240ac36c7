"""Groups shared between servers through Redis: one order per group, presence, outages.

What it is.  ``RedisBackplane(core, "redis://host:6379/0")`` connects one server process
to a Redis server; a ``Group(core, name, backplane=bp)`` made with it is *shared*: its
``Broadcast`` is published on the Redis channel of that group's name, and every server
process subscribed to the channel delivers it to its own members, the sender's server
included.  Redis sends a channel's messages to every subscriber in the order it
executed the PUBLISH commands, so every member of the group, on every server, hears one
order.  Presence (``group.Who()``, ``bp.Who(name)``) lists the names of a group's members
on every server.

Which client, and why our own.  The Redis client is iocpnet itself: a ``ClientService``
with two sessions speaking RESP2 (resp.py), driven by the same completion port and
workers as the game's sessions.  Against redis-py's asyncio client on the core's loop
thread (what ``Spawn`` uses):
- a message coming back from Redis is fanned out by the worker that received it, on the
  subscriber connection's strand, with no hop to another thread and back (redis-py
  would receive it on the loop thread, then post each message to a worker: a wake-up
  and an allocation per message, the thing a backplane does most);
- reconnection is the library's own ``Reconnect`` policy (the back-off grows while
  attempts fail and resets once sharing is back), ``rediss://`` is the core's TLS
  (``ClientService(..., ssl=ctx)``), and the figures, leak counters and tests that cover
  every other session cover these two;
- nothing to install: a server that shares rooms needs no extra package, and no
  thread of its own.
What it costs: we speak only the commands the backplane needs (AUTH, SELECT, CLIENT
SETNAME, PUBLISH, SUBSCRIBE, UNSUBSCRIBE, PING, SET, DEL, HSET, HDEL, PEXPIRE, MULTI,
EXEC, EVALSHA/EVAL), RESP2 only (RESP3 gains nothing here), no Sentinel or Cluster.  An
application that needs Redis for its own data uses redis-py through ``Spawn``.

The two connections.  Index 0, the *command* connection, carries PUBLISH and the
presence commands, pipelined: each command's callback waits in a FIFO that the replies
pop in order (``_Link.waiting``; ``_Link.lock`` makes "append the callback, queue the
bytes" one step, so the FIFO's order is the wire's).  Index 1, the *subscriber*
connection, is in subscribe mode: it SUBSCRIBEs one channel per shared group and
receives the messages, which it delivers with ``Group._deliver`` (the group's own
fan-out under its order lock) on its strand, one at a time, in Redis's order.  A message
is an envelope (``_HEADER``: version, flags, the origin server's id, its sequence
number) and the bytes given to ``Broadcast``, queued to the members by reference.

States (``_state``, under ``_lock``):
- ``DOWN``: no link (not yet connected, or lost).  ``Broadcast`` delivers here at once;
  nothing is shared.  The service reconnects with back-off.
- ``SYNCING``: both links are up and have authenticated; the subscriber is
  (re)subscribing to every group's channel and the command link re-registers presence.
  Still local delivery.  When every subscription is confirmed: ``UP``.
- ``UP``: sharing.  ``Broadcast`` publishes, and remembers the message (``_pending``)
  until it comes back on the channel (it then knows which local session to exclude).
  A group shared while UP holds its broadcasts (``_Share.held``) until its own
  SUBSCRIBE is confirmed, then publishes them: published before we listen, a message
  would never come back to our own members.
- ``DRAINING``: a link was lost while UP or SYNCING.  The other is aborted; until the
  subscriber has ended (no more deliveries can come from it), new broadcasts queue
  behind ``_pending``.  Then every message of ours that did not come back (held or
  pending) is delivered here, in order, and the state is DOWN.  So the members of this
  server lose none of its own messages in an outage and hear each once; what other
  servers published while the link was down is lost (Redis pub/sub keeps nothing).
- ``CLOSED``: ``Close()`` was called; local delivery only.

Presence.  Each registration is a field of the hash ``<prefix>:who:<group>``:
``<incarnation>|<n>`` -> the member's name, where the incarnation is this server's id
and a number that changes each time it (re)registers.  The incarnation is alive while
the key ``<prefix>:alive:<incarnation>`` exists; it has a TTL (``presence_ttl``) that
a timer refreshes three times per TTL.  WHO is one script call (``_WHO_SCRIPT``): the
hash's fields, whose incarnations are alive (one EXISTS per server, not per member), and
the fields of dead ones deleted on the way.  A server killed with SIGKILL stops
refreshing; its alive key expires within the TTL, and WHO stops listing its members at
that moment.  After a reconnect (Redis may have restarted empty, or WHO may have deleted
our fields while we were away) the server registers everything again under a new
incarnation, in one MULTI/EXEC that also deletes the old alive key, so that WHO never
lists a member twice.  Each group's hash has a longer TTL, refreshed by every server
that has members in it, so that a hash whose servers all died goes away too.

Locks.  ``RedisBackplane._lock`` (a threading.Lock) guards the state, the links, the
shares and their presence entries, ``_pending`` and the figures.  It is held while
queueing commands (``_Link.call`` takes the link's lock inside it: order bp lock, then
link lock), never while a group fans out or a user callback runs.  Group calls
``_share``, ``_publish``, ``_joined``, ``_left`` and ``_unshare`` without holding any
lock of its own.  The links' replies run on their strands; callbacks take ``_lock``
themselves.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import ssl as _ssl
import struct
import threading
import time
from collections import deque
from typing import (Any, Callable, Deque, Dict, List, NamedTuple, Optional, Set, Tuple,
                    Union)
from urllib.parse import unquote, urlsplit

from iocpnet._core import ClientService, Group, IocpCore, Reconnect, Session
from iocpnet.resp import Parser, ProtocolError, RespError, encode_command

__all__ = ["RedisBackplane", "RedisAddress", "parse_redis_url"]

log = logging.getLogger("iocpnet")


class RedisAddress(NamedTuple):
    """What a ``redis://`` or ``rediss://`` URL says."""
    host: str
    port: int
    db: int
    username: Optional[str]
    password: Optional[str]
    tls: bool

    def display(self) -> str:
        """The URL without its password (for logs)."""
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """``redis://[[user]:password@]host[:port][/db]``, or ``rediss://`` for TLS.  The
    user and password are percent-decoded; the db defaults to 0, the port to 6379."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"not a redis:// or rediss:// URL: {url!r}")
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    path = parts.path.strip("/")
    if path:
        if not path.isdigit():
            raise ValueError(f"the database in {url!r} must be a number")
        db = int(path)
    else:
        db = 0
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if username is not None and password is None:
        # redis://secret@host: a lone value is the password (AUTH secret), as redis-cli
        # and redis-py read it.
        username, password = None, username
    return RedisAddress(parts.hostname, port, db, username, password,
                        parts.scheme == "rediss")


# Envelope of a shared message: version 1, flags (bit 0: droppable), the origin server's
# 8-byte id, its sequence number.  Then the bytes given to Broadcast.
_HEADER = struct.Struct("<BB8sQ")
_VERSION = 1
_DROPPABLE = 1

# WHO: KEYS[1] the group's hash, ARGV[1] the alive-key prefix.  Returns field, name
# pairs of live incarnations; deletes the fields of dead ones.
_WHO_SCRIPT = b"""
local h = redis.call('HGETALL', KEYS[1])
local alive, out, dead = {}, {}, {}
for i = 1, #h, 2 do
  local f = h[i]
  local inc = string.match(f, '^(.*)|') or ''
  local a = alive[inc]
  if a == nil then
    a = redis.call('EXISTS', ARGV[1] .. inc) == 1
    alive[inc] = a
  end
  if a then
    out[#out + 1] = f
    out[#out + 1] = h[i + 1]
  else
    dead[#dead + 1] = f
  end
end
for i = 1, #dead, 1000 do
  redis.call('HDEL', KEYS[1], unpack(dead, i, math.min(i + 999, #dead)))
end
return out
"""
_WHO_SHA = hashlib.sha1(_WHO_SCRIPT).hexdigest()

DOWN, SYNCING, UP, DRAINING, CLOSED = "down", "syncing", "up", "draining", "closed"
_CMD, _SUB = 0, 1
_ROLE = ("command", "subscriber")


class _LinkDown(Exception):
    """What a command's callback gets when its link went away before the reply."""


Callback = Optional[Callable[[Any], None]]


class _Link(Session):
    """One connection to Redis (index 0: commands; 1: subscriber)."""

    def __init__(self, bp: RedisBackplane, index: int) -> None:
        self.bp = bp
        self.index = index
        self.lock = threading.Lock()
        self.waiting: Deque[Callback] = deque()
        self.waiting_since = 0.0          # when the oldest unanswered command was sent
        self.last_recv = time.monotonic()
        self.parser = Parser(max_reply=bp.max_reply, max_bulk=bp.max_reply)
        self.ready = False                # handshake done
        self.counted = False              # its failure was counted (once per link)
        self.failed = False               # its handshake failed: ignore what follows

    def call(self, cb: Callback, *args: object) -> bool:
        """Queue one command; `cb(reply)` runs on this link's strand with the reply
        (a RespError for an error reply, a _LinkDown if the link ends first)."""
        data = encode_command(*args)
        with self.lock:
            if not self.waiting:
                self.waiting_since = time.monotonic()
            self.waiting.append(cb)
            if self.Send(data):
                return True
            self.waiting.pop()
        return False

    def OnConnected(self) -> None:
        self.last_recv = time.monotonic()
        self.bp._link_connected(self)

    def OnRecv(self, data: Any) -> None:
        self.last_recv = time.monotonic()
        p = self.parser
        try:
            p.feed(data)
            if self.index == _SUB:
                for channel, value in p.messages():
                    if channel is not None:
                        self.bp._on_message(channel, value)
                    else:
                        self._reply(value)
            else:
                for value in p.replies():
                    self._reply(value)
        except ProtocolError as e:
            self.bp._protocol_error(self, str(e))
            self.Abort(f"redis protocol error: {e}")

    def _reply(self, value: Any) -> None:
        with self.lock:
            if not self.waiting:
                raise ProtocolError(f"a reply nobody asked for: {value!r:.80}")
            cb = self.waiting.popleft()
            self.waiting_since = time.monotonic()
        if cb is not None:
            cb(value)
        elif isinstance(value, RespError):
            self.bp._command_error(value)

    def fail_waiting(self) -> None:
        with self.lock:
            callbacks = list(self.waiting)
            self.waiting.clear()
        err = _LinkDown("the connection to redis was lost")
        for cb in callbacks:
            if cb is not None:
                try:
                    cb(err)
                except Exception:
                    log.exception("a redis callback raised")

    def OnConnectFailed(self, reason: str) -> None:
        self.bp._link_failed(self, reason)

    def OnDisconnected(self, reason: str) -> None:
        self.bp._link_down(self, reason)


class _Share:
    """One shared group on this server."""

    __slots__ = ("group", "name", "channel", "key", "subscribed", "held", "entries")

    def __init__(self, group: Group, name: str, channel: bytes, key: bytes) -> None:
        self.group = group
        self.name = name
        self.channel = channel
        self.key = key
        self.subscribed = False
        # Broadcasts waiting for this group's SUBSCRIBE to be confirmed (UP only).
        self.held: List[Tuple[bytes, Optional[Session], bool]] = []
        # Presence: member -> its number (the field is "<incarnation>|<number>").
        self.entries: Dict[Session, int] = {}


_Pending = Tuple[int, _Share, bytes, Optional[Session], bool]


class _Backoff:
    """The Reconnect policy as the ClientService asks it, counting failed attempts of
    the whole link (a connection that comes up but is refused AUTH failed too), and
    reset only once sharing is back."""

    max_attempts = None

    def __init__(self, bp: RedisBackplane, policy: Any) -> None:
        self.bp = bp
        self.policy = policy

    def delay(self, failures: int) -> float:
        return float(self.policy.delay(max(self.bp._failures)))


class RedisBackplane:
    """Shares Groups between server processes through Redis.

    ``RedisBackplane(core, url="redis://127.0.0.1:6379/0", *, ssl=None,
    prefix="iocpnet", presence_ttl=3.0, reconnect=None, timeout=None)``, then
    ``Start()``.  Groups made with ``Group(core, name, backplane=bp)`` are shared:
    ``Broadcast`` reaches the members of every server on the same Redis in one order,
    and ``Who`` lists them.  While Redis is away every server goes on serving its own
    members (delivery here at once), logs the outage once, reconnects with back-off
    (``reconnect``: a ``Reconnect`` policy; default 0.1 s growing to 2 s), subscribes
    again and resumes; what other servers published meanwhile is lost.

    ``ssl``: the ``ssl.SSLContext`` for ``rediss://`` (default: a verifying one).
    ``presence_ttl``: seconds after which a server that stopped (SIGKILL) is no longer
    listed.  ``timeout``: a link with a command unanswered that long is declared dead
    (default: ``max(2 * presence_ttl, 2)``); so is a subscriber that leaves
    ``max_pending`` of our messages unreturned.  ``prefix``: keys and channels are named
    ``<prefix>:...`` (channels also carry the db number: Redis pub/sub ignores dbs).
    """

    def __init__(self, core: IocpCore, url: str = "redis://127.0.0.1:6379/0", *,
                 ssl: Optional[_ssl.SSLContext] = None, prefix: str = "iocpnet",
                 presence_ttl: float = 3.0, reconnect: Any = None,
                 timeout: Optional[float] = None, max_reply: int = 64 << 20,
                 max_pending: int = 100_000) -> None:
        if not isinstance(core, IocpCore):
            raise TypeError("RedisBackplane needs an IocpCore")
        self.address = parse_redis_url(url)
        if presence_ttl < 0.3:
            raise ValueError("presence_ttl must be at least 0.3 s")
        if not prefix or any(c in prefix for c in " \r\n"):
            raise ValueError("prefix must be a non-empty word")
        self.core = core
        self.prefix = prefix
        self.presence_ttl = float(presence_ttl)
        self.timeout = float(timeout) if timeout is not None else \
            max(2.0 * self.presence_ttl, 2.0)
        self.max_reply = int(max_reply)
        self.max_pending = int(max_pending)
        if self.address.tls and ssl is None:
            ssl = _ssl.create_default_context()
        elif not self.address.tls and ssl is not None:
            raise ValueError("ssl= given for a redis:// URL (use rediss://)")
        self.ssl = ssl
        self.reconnect = reconnect if reconnect is not None else \
            Reconnect(initial=0.1, max_delay=2.0, factor=2.0)
        if not hasattr(self.reconnect, "delay"):
            raise TypeError("reconnect must be a Reconnect policy")
        self._origin = os.urandom(8)
        self.server_id = self._origin.hex()
        self._lock = threading.Lock()
        self._state = DOWN
        # The connected links (set on connect, cleared when they end).
        self._links: List[Optional[_Link]] = [None, None]
        # While DRAINING: the subscriber link whose end we wait for.
        self._draining_sub: Optional[_Link] = None
        self._failures = [0, 0]
        self._shares: Dict[str, _Share] = {}
        self._by_channel: Dict[bytes, _Share] = {}
        self._pending: Deque[_Pending] = deque()
        self._seq = 0
        self._entry_seq = 0
        self._epoch = 0
        self._incarnation: Optional[str] = None      # registered presence, if any
        self._sync_waiting = 0            # SUBSCRIBE confirmations the sync waits for
        self._down_since: Optional[float] = time.monotonic()
        self._outage_logged = False
        self._errors_logged: Set[str] = set()
        self._tick_timer: Any = None
        self._service: Optional[ClientService] = None
        # Figures.
        self.published = 0
        self.delivered = 0
        self.delivered_locally = 0        # broadcasts delivered here while not sharing
        self.recovered = 0                # own messages delivered here after a loss
        self.outages = 0
        self.bad_messages = 0

    def __repr__(self) -> str:
        return (f"<RedisBackplane {self.address.display()} {self._state} "
                f"groups={len(self._shares)}>")

    # ---- names in Redis ----

    def _channel(self, name: str) -> bytes:
        return f"{self.prefix}:{self.address.db}:ch:{name}".encode("utf-8")

    def _who_key(self, name: str) -> bytes:
        return f"{self.prefix}:who:{name}".encode("utf-8")

    def _alive_key(self, incarnation: str) -> bytes:
        return f"{self.prefix}:alive:{incarnation}".encode("utf-8")

    # ---- life ----

    @property
    def state(self) -> str:
        """"down", "syncing", "up" (sharing), "draining" or "closed"."""
        return self._state

    @property
    def sharing(self) -> bool:
        """True while broadcasts go through Redis."""
        return self._state == UP

    def Start(self) -> RedisBackplane:
        """Start connecting (returns at once; the core's workers do the rest)."""
        with self._lock:
            if self._service is not None or self._state == CLOSED:
                raise RuntimeError("this RedisBackplane was already started")
            a = self.address
            self._service = ClientService(
                self.core, (a.host, a.port), self._make_link, 2,
                reconnect=_Backoff(self, self.reconnect), ssl=self.ssl)
        self._service.Start()
        interval = self.presence_ttl / 3.0
        self._tick_timer = self.core.CallEvery(interval, self._tick)
        return self

    def Close(self, timeout: float = 2.0) -> None:
        """Stop sharing (idempotent): this server's presence is deleted (best effort)
        and the links closed; shared groups go on with local delivery."""
        with self._lock:
            if self._state == CLOSED:
                return
            was_up = self._state == UP
            self._state = CLOSED
            cmd = self._links[_CMD]
            inc = self._incarnation
            self._incarnation = None
            service, self._service = self._service, None
            timer, self._tick_timer = self._tick_timer, None
            if cmd is not None and inc is not None and cmd.ready:
                cmd.call(None, "DEL", self._alive_key(inc))
        if timer is not None:
            timer.Cancel()
        if service is not None:
            try:
                service.Stop(timeout)       # queued commands are flushed first
            except Exception:
                log.exception("stopping the redis links failed")
        self._flush_lost()
        if was_up:
            log.info("redis backplane: closed")

    # ---- links ----

    def _make_link(self, index: int) -> _Link:
        return _Link(self, index)

    def _link_connected(self, link: _Link) -> None:
        """TCP (and TLS) is up: authenticate, select the db, name the connection."""
        a = self.address
        with self._lock:
            if self._state == CLOSED:
                link.Disconnect("not needed")
                return
            self._links[link.index] = link
            if a.password is not None:
                if a.username is not None:
                    link.call(self._check_handshake(link, "AUTH"), "AUTH", a.username,
                              a.password)
                else:
                    link.call(self._check_handshake(link, "AUTH"), "AUTH", a.password)
            if link.index == _CMD and a.db:
                link.call(self._check_handshake(link, "SELECT"), "SELECT", a.db)
            # Naming the connection helps whoever reads CLIENT LIST; a server that
            # refuses it (an ACL without CLIENT) is not a reason to stop.
            link.call(self._check_handshake(link, "CLIENT SETNAME", fatal=False),
                      "CLIENT", "SETNAME", f"iocpnet-{self.server_id}-{_ROLE[link.index]}")
            link.call(lambda r: self._handshake_done(link, r), "PING")

    def _check_handshake(self, link: _Link, what: str, fatal: bool = True
                         ) -> Callable[[Any], None]:
        def check(reply: Any) -> None:
            if isinstance(reply, RespError) and not link.failed:
                if fatal:
                    self._fail_attempt(link, f"refused {what}: {reply}")
                else:
                    self._command_error(reply)
        return check

    def _count_failure_locked(self, link: _Link) -> None:
        if not link.counted:
            link.counted = True
            self._failures[link.index] += 1

    def _fail_attempt(self, link: _Link, reason: str) -> None:
        """The server refused the handshake (a wrong password, a db it lacks): log
        each such reason once, as the outage's line; the back-off keeps growing."""
        link.failed = True
        with self._lock:
            self._count_failure_locked(link)
            first = reason not in self._errors_logged
            self._errors_logged.add(reason)
            if first:
                self._outage_logged = True
        if first:
            log.error("redis backplane: %s %s; each server delivers to its own members; "
                      "retrying with back-off", self.address.display(), reason)
        link.Abort(f"redis {reason}")

    def _handshake_done(self, link: _Link, reply: Any) -> None:
        if link.failed or isinstance(reply, _LinkDown):
            return
        if isinstance(reply, RespError):
            self._fail_attempt(link, f"refused PING: {reply}")
            return
        with self._lock:
            if self._links[link.index] is not link or self._state == CLOSED:
                return
            link.ready = True
            self._maybe_sync_locked()

    def _maybe_sync_locked(self) -> None:
        cmd, sub = self._links
        if self._state != DOWN or cmd is None or sub is None or \
                not (cmd.ready and sub.ready):
            return
        self._state = SYNCING
        self._sync_waiting = 1                # the presence registration
        for share in self._shares.values():
            share.subscribed = False
            self._sync_waiting += 1
            sub.call(self._subscribed_cb(share, sub), "SUBSCRIBE", share.channel)
        self._register_locked(cmd)

    def _register_locked(self, cmd: _Link) -> None:
        """(Re)register all presence under a new incarnation, atomically."""
        old = self._incarnation
        self._epoch += 1
        inc = f"{self.server_id}.{self._epoch}"
        self._incarnation = inc
        ttl_ms = int(self.presence_ttl * 1000)
        cmd.call(None, "MULTI")
        if old is not None:
            cmd.call(None, "DEL", self._alive_key(old))
        cmd.call(None, "SET", self._alive_key(inc), b"1", "PX", ttl_ms)
        for share in self._shares.values():
            self._hset_all_locked(cmd, share)
        cmd.call(lambda r: self._registered(inc, r), "EXEC")

    def _hset_all_locked(self, cmd: _Link, share: _Share) -> None:
        if not share.entries:
            return
        names = share.group.NameOf
        args: List[object] = ["HSET", share.key]
        for session, n in share.entries.items():
            name = names(session)
            if name is None:
                continue
            args += [self._field(n), name]
        if len(args) > 2:
            cmd.call(None, *args)
            cmd.call(None, "PEXPIRE", share.key, self._hash_ttl_ms())

    def _hash_ttl_ms(self) -> int:
        return int(max(30.0, 10 * self.presence_ttl) * 1000)

    def _field(self, n: int) -> str:
        return f"{self._incarnation}|{n:08x}"

    def _registered(self, inc: str, reply: Any) -> None:
        if isinstance(reply, RespError) or (isinstance(reply, list) and any(
                isinstance(r, RespError) for r in reply)):
            self._command_error(reply if isinstance(reply, RespError)
                                else next(r for r in reply if isinstance(r, RespError)))
        if isinstance(reply, _LinkDown):
            return
        with self._lock:
            if self._state != SYNCING or self._incarnation != inc:
                return
            self._sync_step_locked()

    def _subscribed_cb(self, share: _Share, link: _Link) -> Callable[[Any], None]:
        def done(reply: Any) -> None:
            if isinstance(reply, _LinkDown):
                return
            if isinstance(reply, RespError):
                self._fail_attempt(link, f"refused SUBSCRIBE: {reply}")
                return
            held: List[Tuple[bytes, Optional[Session], bool]] = []
            with self._lock:
                if self._links[_SUB] is not link:
                    return
                if self._shares.get(share.name) is not share:
                    return                    # unshared meanwhile (UNSUBSCRIBE queued)
                share.subscribed = True
                if self._state == SYNCING:
                    self._sync_step_locked()
                elif self._state == UP:
                    held, share.held = share.held, []
                    cmd = self._links[_CMD]
                    if cmd is not None:
                        for data, exclude, droppable in held:
                            self._publish_locked(cmd, share, data, exclude, droppable)
        return done

    def _sync_step_locked(self) -> None:
        self._sync_waiting -= 1
        if self._sync_waiting > 0:
            return
        self._state = UP
        self._failures = [0, 0]
        self._errors_logged.clear()
        down = self._down_since
        self._down_since = None
        logged = self._outage_logged
        self._outage_logged = False
        if logged and down is not None:
            log.warning("redis backplane: sharing again through %s (after %.1f s)",
                        self.address.display(), time.monotonic() - down)
        else:
            log.info("redis backplane: sharing through %s", self.address.display())

    def _link_failed(self, link: _Link, reason: str) -> None:
        with self._lock:
            self._count_failure_locked(link)
        self._log_outage(f"cannot connect: {reason}")

    def _log_outage(self, reason: str) -> None:
        with self._lock:
            if self._outage_logged or self._state == CLOSED:
                return
            self._outage_logged = True
        log.warning("redis backplane: %s is unreachable (%s); each server delivers to "
                    "its own members until it is back", self.address.display(), reason)

    def _link_down(self, link: _Link, reason: str) -> None:
        """A link ended (OnDisconnected): give up sharing, deliver what did not come
        back, let the service reconnect."""
        link.fail_waiting()
        other: Optional[_Link] = None
        flush = False
        with self._lock:
            if self._links[link.index] is link:
                self._links[link.index] = None
            if not link.ready and self._state != CLOSED:
                self._count_failure_locked(link)
            was_ready, link.ready = link.ready, False
            if self._state in (UP, SYNCING) and was_ready:
                if self._state == UP:
                    self.outages += 1
                self._state = DRAINING
                self._incarnation = None
                self._down_since = time.monotonic()
                other = self._links[1 - link.index]
                # Deliveries end when the subscriber has: wait for it if it is not
                # this one.
                self._draining_sub = other if link.index == _CMD else None
                flush = self._draining_sub is None
            elif link is self._draining_sub:
                self._draining_sub = None
                flush = True
            closing = self._state == CLOSED
        stopping = closing or reason in ("client shutdown", "not needed")
        if other is not None:
            other.Abort("the other redis connection was lost")
        if not stopping:
            self._log_outage(reason)
        if flush:
            self._flush_lost()

    def _flush_lost(self) -> None:
        """Nothing more can come back from the subscriber: deliver here every message
        of ours that did not come back, in order; then DOWN."""
        while True:
            with self._lock:
                if self._draining_sub is not None and self._state != CLOSED:
                    return
                batch: List[Tuple[_Share, bytes, Optional[Session], bool]] = []
                for share in self._shares.values():
                    for data, exclude, droppable in share.held:
                        batch.append((share, data, exclude, droppable))
                    share.held = []
                    share.subscribed = False
                for _, share, data, exclude, droppable in self._pending:
                    batch.append((share, data, exclude, droppable))
                self._pending.clear()
                if not batch:
                    if self._state == DRAINING:
                        self._state = DOWN
                        # Both links may be back already: sync now.
                        self._maybe_sync_locked()
                    return
                self.recovered += len(batch)
            for share, data, exclude, droppable in batch:
                if not share.group.closed:
                    share.group._deliver(data, exclude, droppable)

    def _protocol_error(self, link: _Link, reason: str) -> None:
        log.error("redis backplane: %s sent what is not RESP2 on the %s connection: %s",
                  self.address.display(), _ROLE[link.index], reason)

    def _command_error(self, err: Any) -> None:
        text = str(err)
        with self._lock:
            first = text not in self._errors_logged
            self._errors_logged.add(text)
        if first:
            log.error("redis backplane: a command failed: %s", text)

    # ---- groups ----

    def _share(self, group: Group, core: IocpCore) -> None:
        name = _name(group)
        if core is not self.core:
            raise ValueError("the group and the backplane run on different IocpCores")
        if len(name.encode("utf-8")) > 1024:
            raise ValueError("a shared group's name is at most 1024 bytes")
        with self._lock:
            if self._state == CLOSED:
                raise RuntimeError("this RedisBackplane is closed")
            if name in self._shares:
                raise ValueError(f"a group named {name!r} is already shared here "
                                 f"(close it first)")
            share = _Share(group, name, self._channel(name), self._who_key(name))
            self._shares[name] = share
            self._by_channel[share.channel] = share
            sub = self._links[_SUB]
            if self._state in (SYNCING, UP) and sub is not None:
                if self._state == SYNCING:
                    self._sync_waiting += 1
                sub.call(self._subscribed_cb(share, sub), "SUBSCRIBE", share.channel)

    def _unshare(self, group: Group) -> None:
        held: List[Tuple[bytes, Optional[Session], bool]] = []
        with self._lock:
            share = self._shares.get(_name(group))
            if share is None or share.group is not group:
                return
            del self._shares[share.name]
            self._by_channel.pop(share.channel, None)
            held, share.held = share.held, []
            sub, cmd = self._links[_SUB], self._links[_CMD]
            if sub is not None and self._state in (SYNCING, UP):
                if self._state == SYNCING and not share.subscribed:
                    self._sync_step_locked()  # its confirmation no longer awaited
                sub.call(None, "UNSUBSCRIBE", share.channel)
            if cmd is not None and self._incarnation is not None and share.entries:
                cmd.call(None, "HDEL", share.key,
                         *[self._field(n) for n in share.entries.values()])
            share.entries.clear()
        del held   # the group is closed: it has nobody to deliver them to

    def _publish(self, group: Group, data: bytes, exclude: Optional[Session],
                 droppable: bool) -> int:
        with self._lock:
            share = self._shares.get(_name(group))
            state = self._state
            if share is not None and share.group is group:
                if state == UP:
                    if share.subscribed:
                        cmd = self._links[_CMD]
                        if cmd is not None:
                            self._publish_locked(cmd, share, data, exclude, droppable)
                            return _local_count(group, exclude)
                    else:
                        share.held.append((data, exclude, droppable))
                        return _local_count(group, exclude)
                elif state == DRAINING:
                    self._pending.append((0, share, data, exclude, droppable))
                    return _local_count(group, exclude)
            self.delivered_locally += 1
        return int(group._deliver(data, exclude, droppable))

    def _publish_locked(self, cmd: _Link, share: _Share, data: bytes,
                        exclude: Optional[Session], droppable: bool) -> None:
        self._seq += 1
        seq = self._seq
        head = _HEADER.pack(_VERSION, _DROPPABLE if droppable else 0, self._origin, seq)
        if cmd.call(None, "PUBLISH", share.channel, head + data):
            self._pending.append((seq, share, data, exclude, droppable))
            self.published += 1
            if len(self._pending) == self.max_pending:
                # Our messages are not coming back (the subscriber stalled): memory
                # stays bounded; the links are started again, these delivered here.
                sub = self._links[_SUB]
                if sub is not None:
                    sub.Abort(f"{self.max_pending} messages published and not back")
        else:
            # The link is closing: it will end and flush; this one goes with them.
            self._pending.append((0, share, data, exclude, droppable))

    def _on_message(self, channel: bytes, payload: bytes) -> None:
        """A message on a shared group's channel (the subscriber's strand)."""
        if len(payload) < _HEADER.size or payload[0] != _VERSION:
            with self._lock:
                self.bad_messages += 1
                first = "bad envelope" not in self._errors_logged
                self._errors_logged.add("bad envelope")
            if first:
                log.warning("redis backplane: a message on %r without our envelope "
                            "(dropped; published by something else?)", channel)
            return
        _, flags, origin, seq = _HEADER.unpack_from(payload)
        exclude: Optional[Session] = None
        droppable = bool(flags & _DROPPABLE)
        with self._lock:
            share = self._by_channel.get(channel)
            if origin == self._origin:
                pending = self._pending
                while pending and 0 < pending[0][0] <= seq:
                    entry = pending.popleft()
                    if entry[0] == seq:
                        exclude = entry[3]
            self.delivered += 1
        if share is not None:
            share.group._deliver(payload[_HEADER.size:], exclude, droppable)

    # ---- presence ----

    def _joined(self, group: Group, session: Session) -> None:
        """`session` joined `group`, or was renamed in it."""
        with self._lock:
            share = self._shares.get(_name(group))
            if share is None or share.group is not group:
                return
            name = group.NameOf(session)
            if name is None:
                return                        # removed meanwhile
            n = share.entries.get(session)
            if n is None:
                self._entry_seq += 1
                n = share.entries[session] = self._entry_seq
            cmd = self._links[_CMD]
            if cmd is not None and self._incarnation is not None:
                cmd.call(None, "HSET", share.key, self._field(n), name)
                cmd.call(None, "PEXPIRE", share.key, self._hash_ttl_ms())

    def _left(self, group: Group, session: Session) -> None:
        with self._lock:
            share = self._shares.get(_name(group))
            if share is None or share.group is not group:
                return
            n = share.entries.pop(session, None)
            cmd = self._links[_CMD]
            if n is not None and cmd is not None and self._incarnation is not None:
                cmd.call(None, "HDEL", share.key, self._field(n))

    def Who(self, name: str, callback: Optional[Callable[[List[str]], Any]] = None
            ) -> concurrent.futures.Future[List[str]]:
        """Who is in the shared group `name` on every server: a Future of the names
        (sorted by server, then by when they joined).  While Redis is away: the names
        of this server's members only.  ``callback(names)`` runs on a worker (no
        strand: treat it as another thread)."""
        fut: concurrent.futures.Future[List[str]] = concurrent.futures.Future()

        def done(names: List[str]) -> None:
            fut.set_result(names)
            if callback is not None:
                try:
                    callback(names)
                except Exception:
                    log.exception("a Who callback raised")
        self._who(name, done)
        return fut

    def _group_who(self, group: Group, callback: Optional[Callable[[List[str]], Any]]
                   ) -> concurrent.futures.Future[List[str]]:
        fut: concurrent.futures.Future[List[str]] = concurrent.futures.Future()

        def done(names: List[str]) -> None:
            fut.set_result(names)
            if callback is not None:
                group.Post(callback, names)
        self._who(_name(group), done)
        return fut

    def _who(self, name: str, done: Callable[[List[str]], None]) -> None:
        key = self._who_key(name)
        with self._lock:
            cmd = self._links[_CMD]
            if cmd is not None and self._incarnation is not None and cmd.call(
                    lambda r: self._who_reply(name, r, done, True),
                    "EVALSHA", _WHO_SHA, 1, key, self._alive_key("")):
                return
        names = self._local_names(name)
        try:
            self.core.Post(done, names)
        except Exception:
            done(names)                       # the core is closing: answer here

    def _who_reply(self, name: str, reply: Any, done: Callable[[List[str]], None],
                   first: bool) -> None:
        if isinstance(reply, RespError) and reply.kind == "NOSCRIPT" and first:
            with self._lock:
                cmd = self._links[_CMD]
                if cmd is not None and cmd.call(
                        lambda r: self._who_reply(name, r, done, False),
                        "EVAL", _WHO_SCRIPT, 1, self._who_key(name),
                        self._alive_key("")):
                    return
            done(self._local_names(name))
            return
        if not isinstance(reply, list):
            if isinstance(reply, RespError):
                self._command_error(reply)
            done(self._local_names(name))
            return
        pairs = sorted(zip(reply[0::2], reply[1::2]))
        done([n.decode("utf-8", "replace") for _, n in pairs])

    def _local_names(self, name: str) -> List[str]:
        with self._lock:
            share = self._shares.get(name)
        return list(share.group.names) if share is not None else []

    # ---- the refresh tick ----

    def _tick(self) -> None:
        """Every presence_ttl/3: keep our incarnation alive (and notice if Redis lost
        it), keep our groups' hashes, PING the subscriber, and declare a link dead when
        Redis has not answered for `timeout`."""
        now = time.monotonic()
        dead: List[_Link] = []
        with self._lock:
            for link in self._links:
                if link is not None and link.waiting and \
                        now - link.waiting_since > self.timeout:
                    dead.append(link)
            cmd, sub = self._links
            inc = self._incarnation
            if not dead and self._state in (UP, SYNCING):
                if cmd is not None and inc is not None:
                    ttl_ms = int(self.presence_ttl * 1000)
                    cmd.call(lambda r: self._alive_reply(inc, r), "PEXPIRE",
                             self._alive_key(inc), ttl_ms)
                    for share in self._shares.values():
                        if share.entries:
                            cmd.call(lambda r: self._hash_reply(inc, r),
                                     "PEXPIRE", share.key, self._hash_ttl_ms())
                if sub is not None and sub.ready and not sub.waiting:
                    sub.call(None, "PING")
        for link in dead:
            link.Abort(f"redis did not answer for {self.timeout:g} s")

    def _alive_reply(self, inc: str, reply: Any) -> None:
        if reply == 0:
            # Our alive key is gone (we were paused past the TTL, or Redis was flushed):
            # WHO may have deleted our fields; register everything again.
            self._reregister(inc, "this server's presence had expired in redis")

    def _hash_reply(self, inc: str, reply: Any) -> None:
        if reply == 0:
            self._reregister(inc, "a group's presence had vanished from redis")

    def _reregister(self, inc: str, why: str) -> None:
        with self._lock:
            cmd = self._links[_CMD]
            if self._state != UP or self._incarnation != inc or cmd is None:
                return
            log.warning("redis backplane: %s; registering again", why)
            old = self._incarnation
            self._register_locked(cmd)
            del old

    def stats(self) -> Dict[str, Any]:
        """Figures: state, messages published, delivered from Redis, delivered here
        while not sharing, recovered after a loss, outages, bad messages, groups."""
        with self._lock:
            return {
                "state": self._state, "published": self.published,
                "delivered": self.delivered, "delivered_locally": self.delivered_locally,
                "recovered": self.recovered, "outages": self.outages,
                "bad_messages": self.bad_messages, "groups": len(self._shares),
                "pending": len(self._pending),
            }


def _name(group: Group) -> str:
    name = group.name
    assert isinstance(name, str)          # a shared group's name is (Group checks)
    return name


def _local_count(group: Group, exclude: Optional[Session]) -> int:
    n = len(group)
    if exclude is not None and exclude in group:
        n -= 1
    return n
