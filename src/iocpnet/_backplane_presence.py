"""The backplane's presence: who is in each shared group, on every server.

What it owns.  ``_Presence``, the part of RedisBackplane (a base class of it) that
registers this server's members in Redis, answers WHO, and keeps both alive with the
refresh tick; the WHO script.  The links and the states it relies on (``_links``,
``_state``, ``_incarnation``) are backplane.py's.

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

Locks.  Everything here runs under the backplane's ``_lock`` (methods named
``_locked`` expect it held; the others take it), queueing commands on the command link
inside it (order: backplane lock, then link lock).  WHO's callbacks and a group's
``Post`` run outside it.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from iocpnet._backplane_link import _CMD, _Link, _LinkDown
from iocpnet._core import Group, IocpCore, Session
from iocpnet.resp import RespError

log = logging.getLogger("iocpnet")

DOWN, SYNCING, UP, DRAINING, CLOSED = "down", "syncing", "up", "draining", "closed"

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


class _Presence:
    """Presence for RedisBackplane (its base class; the state is the backplane's)."""

    # Set by RedisBackplane.__init__ (declared here for the type checker).
    core: IocpCore
    prefix: str
    presence_ttl: float
    timeout: float
    server_id: str
    _lock: threading.Lock
    _state: str
    _links: List[Optional[_Link]]
    _shares: Dict[str, _Share]
    _incarnation: Optional[str]
    _entry_seq: int
    _epoch: int
    # RedisBackplane's methods that presence calls.
    _sync_step_locked: Callable[[], None]
    _command_error: Callable[[Any], None]

    def _who_key(self, name: str) -> bytes:
        return f"{self.prefix}:who:{name}".encode("utf-8")

    def _alive_key(self, incarnation: str) -> bytes:
        return f"{self.prefix}:alive:{incarnation}".encode("utf-8")

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
            _resolve(fut, names)
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
            _resolve(fut, names)
            if callback is not None:
                try:
                    group.Post(callback, names)
                except Exception:
                    # queue.Full (the group's strand is flooded): this runs in the
                    # Redis link's reply handler, which must not fail for it.
                    log.exception("a Who callback could not be posted to %r", group)
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
        if isinstance(reply, _LinkDown):
            done(self._local_names(name))
            return
        if not isinstance(reply, list) or len(reply) % 2 or \
                not all(type(x) is bytes for x in reply):
            # A broken or hostile peer's pairs: decoding them raised in this callback,
            # which dropped the link and left the Who unanswered.
            self._command_error(reply if isinstance(reply, RespError) else
                                f"WHO: not field, name pairs of bulk strings: "
                                f"{reply!r:.80}")
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


def _name(group: Group) -> str:
    name = group.name
    assert isinstance(name, str)          # a shared group's name is (Group checks)
    return name


def _resolve(fut: concurrent.futures.Future[List[str]], names: List[str]) -> None:
    """Give a Who future its answer, unless its holder cancelled it meanwhile
    (asyncio.wait_for over asyncio.wrap_future does, at its timeout): set_result
    would raise on the redis link's strand and drop the link."""
    try:
        fut.set_result(names)
    except concurrent.futures.InvalidStateError:
        pass
