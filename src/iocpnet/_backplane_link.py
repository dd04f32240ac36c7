"""The backplane's connections to Redis: the URL, one RESP2 link, the back-off.

What it owns.  ``parse_redis_url`` (what a ``redis://`` or ``rediss://`` URL says),
``_Link``, the Session subclass that speaks RESP2 (resp.py) on one connection, and
``_Backoff``, the ClientService's reconnection policy as the backplane counts failures.
What the links carry, and the states they drive, are backplane.py's; who is in which
group is _backplane_presence.py's.

The two connections.  Index 0, the *command* connection, carries PUBLISH and the
presence commands, pipelined: each command's callback waits in a FIFO that the replies
pop in order (``_Link.waiting``; ``_Link.lock`` makes "append the callback, queue the
bytes" one step, so the FIFO's order is the wire's).  Index 1, the *subscriber*
connection, is in subscribe mode: it SUBSCRIBEs one channel per shared group and
receives the messages, which it delivers with ``Group._deliver`` (the group's own
fan-out, in its turn among the group's broadcasts) on its strand, one at a time, in
Redis's order.  A message
is an envelope (``_HEADER``: version, flags, the origin server's id, its sequence
number) and the bytes given to ``Broadcast``, queued to the members by reference.

Locks.  ``_Link.lock`` makes "append the callback, queue the bytes" one step and
guards the FIFO of callbacks (``waiting``) and ``waiting_since``.  A caller holding the
backplane's ``_lock`` may take it (order: backplane lock, then link lock), never the
other way round.  Replies and messages run on the link's strand, one at a time;
callbacks run outside the link's lock.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, List, NamedTuple, Optional, Protocol
from urllib.parse import unquote, urlsplit

from iocpnet._core import Session
from iocpnet.resp import Parser, ProtocolError, RespError, encode_command

log = logging.getLogger("iocpnet")

_CMD, _SUB = 0, 1
_ROLE = ("command", "subscriber")


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


class _LinkOwner(Protocol):
    """What a link needs of its owner (RedisBackplane): where it reports."""

    max_reply: int
    _failures: List[int]

    def _link_connected(self, link: _Link) -> None: ...
    def _on_message(self, channel: bytes, payload: bytes) -> None: ...
    def _protocol_error(self, link: _Link, reason: str) -> None: ...
    def _command_error(self, err: Any) -> None: ...
    def _link_failed(self, link: _Link, reason: str) -> None: ...
    def _link_down(self, link: _Link, reason: str) -> None: ...


class _LinkDown(Exception):
    """What a command's callback gets when its link went away before the reply."""


Callback = Optional[Callable[[Any], None]]


class _Link(Session):
    """One connection to Redis (index 0: commands; 1: subscriber)."""

    # The command link carries every shared group's broadcasts of this server, not one
    # client's replies: a burst, or Redis pausing (a fork for a save, a slow command),
    # must not cut it at a session's 4 MiB, which would be an outage (what the other
    # servers publish meanwhile is lost).  A Redis that stops reading for good is
    # found by the unanswered-command `timeout` first; this bounds the memory until
    # then.  (Receiving pauses at a quarter of it, as for any session: only replies.)
    send_queue_limit = 64 << 20

    def __init__(self, bp: _LinkOwner, index: int) -> None:
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
            _run_callback(cb, value)
        elif isinstance(value, RespError):
            self.bp._command_error(value)

    def fail_waiting(self) -> None:
        with self.lock:
            callbacks = list(self.waiting)
            self.waiting.clear()
        err = _LinkDown("the connection to redis was lost")
        for cb in callbacks:
            if cb is not None:
                _run_callback(cb, err)

    def OnConnectFailed(self, reason: str) -> None:
        self.bp._link_failed(self, reason)

    def OnDisconnected(self, reason: str) -> None:
        self.bp._link_down(self, reason)


def _run_callback(cb: Callable[[Any], None], value: Any) -> None:
    """A command's callback, contained: one that raises (a bug) is logged.  Raised into
    OnRecv it dropped the link as a failed hook (an outage for every shared group) and
    lost the replies parsed after it."""
    try:
        cb(value)
    except Exception:
        log.exception("a redis callback raised")


class _Backoff:
    """The Reconnect policy as the ClientService asks it, counting failed attempts of
    the whole link (a connection that comes up but is refused AUTH failed too), and
    reset only once sharing is back."""

    max_attempts = None

    def __init__(self, bp: _LinkOwner, policy: Any) -> None:
        self.bp = bp
        self.policy = policy

    def delay(self, failures: int) -> float:
        return float(self.policy.delay(max(self.bp._failures)))
