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

The connections (_backplane_link.py): index 0 carries the commands, pipelined;
index 1 is the subscriber.  Presence (_backplane_presence.py): who is in each group,
on every server.  This file holds the states below and the groups' traffic.

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
  would never come back to our own members.  Held and pending count together against
  ``max_pending``: at the bound the state is DRAINING at once (nothing more is
  published) and both links are aborted.
- ``DRAINING``: a link was lost while UP or SYNCING, or max_pending was reached.  The
  other is aborted; until the subscriber has ended (no more deliveries can come from
  it), new broadcasts queue behind ``_pending``.  Then every message of ours that did
  not come back (held or pending) is delivered here, in order, and the state is DOWN.
  So the members of this server lose none of its own messages in an outage and hear
  each once; what other servers published while the link was down is lost (Redis
  pub/sub keeps nothing).
- ``CLOSED``: ``Close()`` was called; local delivery only.

Locks.  ``RedisBackplane._lock`` (a threading.Lock) guards the state, the links, the
shares and their presence entries, ``_pending`` and the figures.  It is held while
queueing commands (``_Link.call`` takes the link's lock inside it: order bp lock, then
link lock), never while a group fans out or a user callback runs, nor while a link is
aborted (its OnDisconnected may run at once, in the caller, and takes it).  Group calls
``_share``, ``_publish``, ``_joined``, ``_left`` and ``_unshare`` without holding any
lock of its own.  The links' replies run on their strands; callbacks take ``_lock``
themselves.
"""
from __future__ import annotations

import logging
import os
import ssl as _ssl
import struct
import threading
import time
import traceback
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

from iocpnet._backplane_link import (_CMD, _ROLE, _SUB, RedisAddress, _Backoff, _Link,
                                     _LinkDown, log, parse_redis_url)
from iocpnet._backplane_presence import (CLOSED, DOWN, DRAINING, SYNCING, UP, _name,
                                         _Presence, _Share)
from iocpnet._core import ClientService, Group, IocpCore, LogBurst, Reconnect, Session
from iocpnet.resp import RespError

__all__ = ["RedisBackplane", "RedisAddress", "parse_redis_url"]


# Envelope of a shared message: version 1, flags (bit 0: droppable), the origin server's
# 8-byte id, its sequence number.  Then the bytes given to Broadcast.
_HEADER = struct.Struct("<BB8sQ")
_VERSION = 1
_DROPPABLE = 1


_Pending = Tuple[int, _Share, bytes, Optional[Session], bool]


class RedisBackplane(_Presence):
    """Shares Groups between server processes through Redis.

    ``RedisBackplane(core, url="redis://127.0.0.1:6379/0", *, ssl=None,
    prefix="iocpnet", presence_ttl=3.0, reconnect=None, timeout=None)``, then
    ``Start()``.  Groups made with ``Group(core, name, backplane=bp)`` are shared:
    ``Broadcast`` reaches the members of every server on the same Redis in one order,
    and ``Who`` lists them.  While Redis is away every server goes on serving its own
    members (delivery here at once), logs the outage once (the connection lost; then,
    if Redis does not answer, that it is unreachable: Redis also drops a subscriber
    that falls behind, and is back at once), reconnects with back-off (``reconnect``: a
    ``Reconnect`` policy; default 0.1 s growing to 2 s), subscribes again and resumes;
    what other servers published meanwhile is lost.

    ``ssl``: the ``ssl.SSLContext`` for ``rediss://`` (default: a verifying one).
    ``presence_ttl``: seconds after which a server that stopped (SIGKILL) is no longer
    listed.  ``timeout``: a link with a command unanswered that long is declared dead
    (default: ``max(2 * presence_ttl, 2)``); so is a subscriber that leaves
    ``max_pending`` of our messages unreturned (published, or held for a group's
    SUBSCRIBE not yet confirmed): no more than that is ever published and not back,
    and what is broadcast after it is delivered here, after them.  Until then a link
    holds up to 64 MiB that Redis has not read yet (its ``send_queue_limit``; a
    session's is 4 MiB): a burst of broadcasts, or Redis pausing for a moment, is no
    outage.  ``prefix``: keys
    and channels are named ``<prefix>:...`` (channels also carry the db number: Redis
    pub/sub ignores dbs).
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
        self._held = 0                    # broadcasts in every share's `held`
        self._seq = 0
        self._entry_seq = 0
        self._epoch = 0
        self._incarnation: Optional[str] = None      # registered presence, if any
        self._sync_waiting = 0            # SUBSCRIBE confirmations the sync waits for
        self._down_since: Optional[float] = time.monotonic()
        self._outage_logged = False       # this outage's line was logged
        self._loss_logged = False         # "lost the ... connection" was logged
        self._stall: Optional[str] = None  # why we ended the links at max_pending
        self._aborts: List[Tuple[_Link, str]] = []   # links to end once the lock is free
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
        self._bad_log = LogBurst(core, "bad messages from redis")

    def __repr__(self) -> str:
        return (f"<RedisBackplane {self.address.display()} {self._state} "
                f"groups={len(self._shares)}>")

    # ---- names in Redis ----

    def _channel(self, name: str) -> bytes:
        return f"{self.prefix}:{self.address.db}:ch:{name}".encode("utf-8")

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
                    self._held -= len(held)
                    cmd = self._links[_CMD]
                    if cmd is not None:
                        for data, exclude, droppable in held:
                            self._publish_locked(cmd, share, data, exclude, droppable)
            if self._aborts:
                self._end_stalled_links()
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
        logged = self._outage_logged or self._loss_logged
        self._outage_logged = self._loss_logged = False
        self._stall = None
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

    def _log_loss(self, link: _Link, reason: str) -> None:
        """A link that was up ended.  Not "unreachable": Redis may well be up (it drops
        a subscriber that falls behind); if it is not, the next attempt says so."""
        with self._lock:
            if self._outage_logged or self._loss_logged or self._state == CLOSED:
                return
            self._loss_logged = True
            stall, self._stall = self._stall, None
        if stall is not None:
            log.warning("redis backplane: stopped sharing through %s (%s): Redis, or "
                        "this server's subscriber connection, stalled; both connections "
                        "start again, and this server delivers to its own members until "
                        "sharing is back", self.address.display(), stall)
            return
        why = (": Redis stopped, or dropped a subscriber that fell behind (its "
               "client-output-buffer-limit for pubsub: are the workers too busy to "
               "read?)" if link.index == _SUB else "")
        log.warning("redis backplane: lost the %s connection to %s (%s)%s; this server "
                    "delivers to its own members until sharing is back", _ROLE[link.index],
                    self.address.display(), reason, why)

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
                self._begin_draining_locked()
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
        if stopping:
            pass
        elif was_ready:
            self._log_loss(link, reason)
        else:
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
                self._held = 0
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
        """A link received what is not RESP2 (it is aborted next): logged once per
        outage, as the outage's line (a peer that is not Redis answers every attempt
        so); the repeats at DEBUG."""
        with self._lock:
            first = "protocol error" not in self._errors_logged
            self._errors_logged.add("protocol error")
            if first:
                self._outage_logged = True
        log.log(logging.ERROR if first else logging.DEBUG,
                "redis backplane: %s sent what is not RESP2 on the %s connection: %s",
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
            self._held -= len(held)
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
        try:
            with self._lock:
                share = self._shares.get(_name(group))
                state = self._state
                if share is not None and share.group is group:
                    if state == UP:
                        if share.subscribed:
                            cmd = self._links[_CMD]
                            if cmd is not None:
                                self._publish_locked(cmd, share, data, exclude,
                                                     droppable)
                                return _local_count(group, exclude)
                        else:
                            share.held.append((data, exclude, droppable))
                            self._held += 1
                            self._check_backlog_locked()
                            return _local_count(group, exclude)
                    elif state == DRAINING:
                        self._pending.append((0, share, data, exclude, droppable))
                        return _local_count(group, exclude)
                self.delivered_locally += 1
            return int(group._deliver(data, exclude, droppable))
        finally:
            if self._aborts:              # read without the lock: a hint, taken under it
                self._end_stalled_links()

    def _publish_locked(self, cmd: _Link, share: _Share, data: bytes,
                        exclude: Optional[Session], droppable: bool) -> None:
        self._seq += 1
        seq = self._seq
        head = _HEADER.pack(_VERSION, _DROPPABLE if droppable else 0, self._origin, seq)
        if cmd.call(None, "PUBLISH", share.channel, head + data):
            self._pending.append((seq, share, data, exclude, droppable))
            self.published += 1
            self._check_backlog_locked()
        else:
            # The link is closing: it will end and flush; this one goes with them.
            self._pending.append((0, share, data, exclude, droppable))

    def _check_backlog_locked(self) -> None:
        """Our messages not back yet, published or held for a SUBSCRIBE, reached
        max_pending: the subscriber stalled (or Redis did).  From this moment nothing
        more is published (DRAINING: later broadcasts queue behind these), both links
        are started again, and these are delivered here once the subscriber has ended.
        (Aborted but still UP until a worker handled the end, it went on publishing
        past the bound; held ones alone were bounded only by `timeout`.)"""
        if self._held + len(self._pending) < self.max_pending:
            return
        sub, cmd = self._links[_SUB], self._links[_CMD]
        if self._state != UP or sub is None:
            return
        held = (f" ({self._held} of them held for a SUBSCRIBE not confirmed)"
                if self._held else "")
        why = f"{self.max_pending} of our messages not back{held}"
        self._begin_draining_locked()
        self._draining_sub = sub          # deliveries end when it has ended
        self._stall = why
        self._aborts.append((sub, why))
        if cmd is not None:
            self._aborts.append((cmd, why))

    def _end_stalled_links(self) -> None:
        """The aborts _check_backlog_locked asked for, made once the lock is free, as
        every Abort of a link is: it may run the link's OnDisconnected at once, in this
        thread (the core does when nothing of the link's is in flight), and that takes
        the lock."""
        with self._lock:
            aborts, self._aborts = self._aborts, []
        for link, why in aborts:
            link.Abort(why)

    def _begin_draining_locked(self) -> None:
        if self._state == UP:
            self.outages += 1
        self._state = DRAINING
        self._incarnation = None
        self._down_since = time.monotonic()

    def _on_message(self, channel: bytes, payload: bytes) -> None:
        """A message on a shared group's channel (the subscriber's strand), contained:
        whatever raises here (a member's Send past what the fan-out catches: a plain
        session's MemoryError, an override's SystemExit; a bug) drops this message,
        not the link.  Raised into OnRecv it dropped the subscriber as a failed hook,
        an outage for every shared group, and the messages after it in that receive."""
        try:
            self._take_message(channel, payload)
        except BaseException as e:      # what the core's hooks contain, as they do
            tb = traceback.extract_tb(e.__traceback__)
            where = f" at {tb[-1].filename}:{tb[-1].lineno}" if tb else ""
            self._bad_message(logging.ERROR, channel, f"its delivery raised "
                              f"{type(e).__name__}: {e}{where}")

    def _take_message(self, channel: bytes, payload: bytes) -> None:
        if len(payload) < _HEADER.size or payload[0] != _VERSION:
            # Another client of this Redis publishing on our channel, or a newer
            # iocpnet (its envelope is not ours to read: dropped, as junk is).
            self._bad_message(logging.WARNING, channel, (
                f"envelope version {payload[0]} (a newer iocpnet on the same Redis?)"
                if len(payload) >= _HEADER.size else
                f"not our envelope ({len(payload)} bytes; published by something "
                f"else?)"))
            return
        _, flags, origin, seq = _HEADER.unpack_from(payload)
        exclude: Optional[Session] = None
        droppable = bool(flags & _DROPPABLE)
        with self._lock:
            if origin != self._origin:
                share = self._by_channel.get(channel)
            else:
                # Ours goes to the group it was broadcast to, not to whichever has the
                # channel now (a room closed and made again under its name while it was
                # on its way: a closed group has nobody to hear it); and only if it is
                # still pending (after a Close or a loss it was delivered here; or it is
                # forged: our id is in CLIENT LIST).  Normally the first pending; one
                # further on means those before it will not come (a PUBLISH refused).
                share = None
                pending = self._pending
                if seq > 0 and pending and (pending[0][0] == seq or (
                        0 < pending[0][0] < seq and any(e[0] == seq for e in pending))):
                    while True:
                        entry = pending.popleft()
                        if entry[0] == seq:
                            share, exclude = entry[1], entry[3]
                            break
            if share is not None:
                self.delivered += 1
        if share is not None:
            share.group._deliver(payload[_HEADER.size:], exclude, droppable)

    def _bad_message(self, level: int, channel: bytes, why: str) -> None:
        """Counted, and logged per burst: a peer publishing junk on our channels in a
        loop must not make a line per message."""
        with self._lock:
            self.bad_messages += 1
        self._bad_log.log(level, f"redis backplane: dropped a message on {channel!r}: "
                                 f"{why}")

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


def _local_count(group: Group, exclude: Optional[Session]) -> int:
    n = len(group)
    if exclude is not None and exclude in group:
        n -= 1
    return n
