"""A chat server with rooms: PacketSession, a PacketHandler and Groups.

    python examples/chat_server.py --port 11022 --web-port 8080
    python examples/chat_client.py --port 11022 --join lobby
    (and open http://127.0.0.1:8080/ in a browser)

Several servers, one set of rooms (through Redis):

    python examples/chat_server.py --port 11022 --redis redis://127.0.0.1:6379
    python examples/chat_server.py --port 11023 --redis redis://127.0.0.1:6379
    (or the same --port with --reuse-port in each, as `python -m iocpnet echo
    --processes N` does for the echo server)

Clients take a nick, join and leave rooms (64 at once at most), say things in them (5
a second, 20 at once: --say-rate), and ask for the room list or who is in a room (as
often: --query-rate).  Joins are limited too (--join-rate).  The protocol (packet ids and payloads) is defined and documented in one module,
``iocpnet.chat_protocol``, shared by this server, the client and
``python -m iocpnet dummy-client --protocol chat``.

What to look at:

- ``handler = iocpnet.PacketHandler()`` and ``@handler.route(C_SAY)``: each packet id
  goes to one function; unknown ids disconnect the sender (the handler's default).
- A room is an ``iocpnet.Group``: a packet is built once (``make_packet``) and
  ``room.Broadcast`` queues it to every member by reference, in one order for every
  member, whichever worker thread handled each sender.
- ``--redis URL``: the rooms are shared (``Group(core, name, backplane=...)``): a
  room's S_JOINED, S_LEFT, S_SAID (and S_NICK) reach its members on every server in
  one order, and C_WHO lists them all.  S_ROOMS lists this server's rooms.  Nicks are
  unique per server (guests get the server's tag).  If Redis goes away each server
  goes on with its own members and shares again when it is back.
- ``OnDisconnected`` tells the rooms the session left (the Groups took it out
  already): nothing keeps a session after it ends.
- ``--web-port``: the same ``ChatSession`` class on a second listener,
  ``Listener(..., websocket=True)``: browsers get the page (chat_page.html) from
  ``OnUpgrade`` and then send the same packets in binary WebSocket messages, to the
  same rooms as the native clients.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set

import iocpnet
from iocpnet import chat_protocol as proto

log = logging.getLogger("chat_server")

handler = iocpnet.PacketHandler()

# Rooms one client may be in at once: each is a Group (about 1.3 KiB, and a Redis
# subscription when shared) that one client joining made-up names would make without end.
MAX_ROOMS_PER_SESSION = 64

# What one client may say: each SAY goes to every member of the room, so a client saying
# 300 things at once made 300 deliveries per member, and the members that read slowly
# were the ones cut (by their send queue limit).  A token bucket per client: SAY_BURST
# at once, then SAY_RATE a second (--say-rate; 0: no limit, for load tests).  A SAY over
# it is refused with an error and still costs a token; a client that ignores a whole
# burst of refusals is disconnected.
SAY_RATE = 5.0
SAY_BURST = 20
# What one client may ask (WHO, ROOMS): each answer lists a whole room, or every room,
# built and sent per request.  A bucket of their own, the same rules (--query-rate).
QUERY_RATE = 5.0
QUERY_BURST = 20
# A join tells every member of the room and answers with its member list (as does the
# leave that follows it): a client joining and leaving a big room in a loop made the
# server do that as fast as it could ask.  A bucket of its own (--join-rate), wide
# enough to fill every room at once, leave them all and fill them again; a join refused
# for another reason (already in, too many rooms) tells nobody and costs no token.
JOIN_RATE = 5.0
JOIN_BURST = 2 * MAX_ROOMS_PER_SESSION

# The browser client, served on the --web-port listener.
PAGE = (Path(__file__).resolve().parent / "chat_page.html").read_bytes()


class RateLimit:
    """One kind of request's limit per client: a token bucket holding `burst` tokens,
    refilled at `rate` a second (0: no limit).  The bucket is the session's (a
    [tokens, stamp] list) and is used on its strand: no lock."""

    def __init__(self, what: str, rate: float, burst: int) -> None:
        self.what = what                  # "messages", "questions", "joins"
        self.rate = rate
        self.burst = burst

    def bucket(self) -> List[float]:
        return [float(self.burst), time.monotonic()]

    def allowed(self, session: ChatSession, bucket: List[float]) -> bool:
        """Take a token.  A request over the limit is answered with an error (and
        still costs a token); one a burst past that, the client is cut."""
        if self.rate <= 0:
            return True
        now = time.monotonic()
        burst = self.burst
        tokens = min(float(burst), bucket[0] + (now - bucket[1]) * self.rate)
        bucket[0], bucket[1] = tokens - 1.0, now
        if tokens >= 1.0:
            return True
        if tokens - 1.0 <= -burst:
            why = (f"flooding: {burst} {self.what} refused in a row (at most "
                   f"{self.rate:g} a second, {burst} at once)")
            session.server.log_burst(session, "flooders cut").log(
                logging.WARNING, f"{session.nick} disconnected: {why}")
            session.Disconnect(why)
        else:
            session.Send(proto.error(f"too fast: at most {self.rate:g} {self.what} a "
                                     f"second ({burst} at once); dropped"))
        return False


class ChatServer:
    """The state shared by all sessions of one server: rooms and nicks.

    A room is an ``iocpnet.Group`` named after it, made on its first join here and
    closed when its last member here leaves.  With a ``RedisBackplane`` the groups are
    shared: every server on the same Redis hears a room's messages in one order, and
    WHO lists the members of all of them.
    """

    def __init__(self, backplane: Optional[iocpnet.RedisBackplane] = None, *,
                 say_rate: float = SAY_RATE, say_burst: int = SAY_BURST,
                 query_rate: float = QUERY_RATE, query_burst: int = QUERY_BURST,
                 join_rate: float = JOIN_RATE, join_burst: int = JOIN_BURST) -> None:
        # Guards `rooms` and `nicks`.  Held around joins, leaves and nick changes (a
        # room is made and closed under it); saying something takes no lock at all:
        # Group.Broadcast keeps each room's order by itself.
        self.lock = threading.Lock()
        self.backplane = backplane
        self.rooms: Dict[str, iocpnet.Group] = {}
        self.nicks: Dict[str, ChatSession] = {}
        self._guests = itertools.count(1)
        # With Redis, nicks are unique per server only: guests get this server's tag,
        # so that two servers never hand out the same guest name.
        self._tag = f"-{backplane.server_id[:4]}" if backplane is not None else ""
        # A line per client cut (malformed packets, floods) is one a client can make us
        # write at will: per burst (iocpnet.LogBurst: 5 in full, then a count), one
        # LogBurst per kind, made on first use (on the sessions' core).
        self._log_bursts: Dict[str, iocpnet.LogBurst] = {}
        # Its own lock: a LogBurst may be wanted while `lock` is held (a join's answer).
        self._log_bursts_lock = threading.Lock()
        self.say_limit = RateLimit("messages", say_rate, say_burst)
        self.query_limit = RateLimit("questions", query_rate, query_burst)
        self.join_limit = RateLimit("joins", join_rate, join_burst)

    def log_burst(self, session: ChatSession, what: str) -> iocpnet.LogBurst:
        burst = self._log_bursts.get(what)
        if burst is None:
            service = session.service
            assert service is not None          # a session in a hook has one
            with self._log_bursts_lock:
                burst = self._log_bursts.get(what)
                if burst is None:
                    burst = self._log_bursts[what] = iocpnet.LogBurst(
                        service.core, what, logger=log)
        return burst

    def session_factory(self) -> ChatSession:
        return ChatSession(self)

    def new_guest(self, session: ChatSession) -> str:
        with self.lock:
            while True:
                name = f"guest-{next(self._guests)}{self._tag}"
                if name not in self.nicks:
                    self.nicks[name] = session
                    return name

    def rename(self, session: ChatSession, new: str) -> Optional[str]:
        """Give `session` the nick `new`; returns a reason if it cannot have it."""
        if not proto.valid_name(new):
            return f"invalid nick {new!r} (1 to {proto.MAX_NAME_BYTES} bytes, no spaces)"
        with self.lock:
            old = session.nick
            if new == old:
                return None
            if new in self.nicks:
                return f"the nick {new!r} is taken"
            del self.nicks[old]
            self.nicks[new] = session
            session.nick = new
            packet = proto.nick_changed(old, new)
            rooms = [self.rooms[name] for name in sorted(session.rooms)]
            for room in rooms:
                room.Rename(session, new)
            if self.backplane is None:
                # Everyone who shares a room with the session hears it once, and so
                # does it.
                told: Dict[iocpnet.Session, None] = {session: None}
                for room in rooms:
                    told.update(dict.fromkeys(room))
                session.broadcast(packet, told)
            else:
                # Shared rooms: each room hears it (a member of two of them, twice),
                # the session once.
                session.Send(packet)
                for room in rooms:
                    room.Broadcast(packet, exclude=session)
        log.info("%s is now %s", old, new)
        return None

    def join(self, session: ChatSession, name: str) -> Optional[str]:
        if not proto.valid_name(name):
            return f"invalid room name {name!r} (1 to {proto.MAX_NAME_BYTES} bytes, no spaces)"
        # session.rooms changes on the session's strand only (here, in leave and gone):
        # read without the lock.
        if name in session.rooms:
            return f"you are already in {name}"
        if len(session.rooms) >= MAX_ROOMS_PER_SESSION:
            return f"you are in {MAX_ROOMS_PER_SESSION} rooms already: leave one first"
        if not self.join_limit.allowed(session, session.join_bucket):
            return None
        with self.lock:
            room = self.rooms.get(name)
            if room is None:
                service = session.service
                assert service is not None          # a session in a hook has one
                room = self.rooms[name] = iocpnet.Group(service, name,
                                                        backplane=self.backplane)
            if not room.Add(session, name=session.nick):
                if not len(room):                 # ended meanwhile: nobody to tell
                    room.Close()
                    del self.rooms[name]
                return "you are leaving"
            session.rooms.add(name)
            room.Broadcast(proto.joined(name, session.nick))
            if room.backplane is None:
                self.answer_who(session, name, room.names)
            else:
                # Every server's members: answered when Redis has (after the S_JOINED
                # of the members here, maybe before the echo of this one's own).
                room.Who(lambda names: self.answer_who(session, name, names))
        log.info("%s joined %s", session.nick, name)
        return None

    def leave(self, session: ChatSession, name: str) -> Optional[str]:
        with self.lock:
            room = self.rooms.get(name)
            if room is None or name not in session.rooms:
                return f"you are not in {name}"
            # The leaver hears it too (a session that has ended just does not take it).
            packet = proto.left(name, session.nick)
            if room.backplane is None:
                room.Broadcast(packet)
            else:
                # The room's message comes back from Redis after the leaver is out:
                # it gets its own copy now, after everything the room sent it so far.
                session.Send(packet)
                room.Broadcast(packet, exclude=session)
            room.Remove(session)
            session.rooms.discard(name)
            if not len(room):
                room.Close()
                del self.rooms[name]
        log.info("%s left %s", session.nick, name)
        return None

    def say(self, session: ChatSession, name: str, message: str) -> Optional[str]:
        if not self.say_limit.allowed(session, session.say_bucket):
            return None
        room = self.rooms.get(name)
        if room is None or name not in session.rooms:
            return f"you are not in {name}"
        if len(message.encode("utf-8")) > proto.MAX_TEXT_BYTES:
            return f"message too long (at most {proto.MAX_TEXT_BYTES} bytes)"
        room.Broadcast(proto.said(name, session.nick, message))    # built once
        return None

    def rooms_list(self, session: ChatSession) -> None:
        """Answer `session` with the rooms with members on this server (and how many
        here)."""
        if not self.query_limit.allowed(session, session.query_bucket):
            return
        with self.lock:
            entries = [(name, len(r)) for name, r in self.rooms.items()]
        session.Send(proto.room_list(sorted(entries)))

    def who(self, session: ChatSession, name: str) -> None:
        """Answer `session` with who is in `name` (every server's members, with Redis)."""
        if not self.query_limit.allowed(session, session.query_bucket):
            return
        if not proto.valid_name(name):
            # No room has it; and one over a str8's 255 bytes made the answer raise.
            session.Send(proto.error(f"invalid room name {name!r:.80}"))
            return
        if self.backplane is not None:
            self.backplane.Who(name, lambda names: self.answer_who(session, name, names))
            return
        with self.lock:
            room = self.rooms.get(name)
            names = room.names if room is not None else []
        self.answer_who(session, name, names)

    def answer_who(self, session: ChatSession, room: str, names: List[str]) -> None:
        """S_WHO with the names the protocol allows.  Every server takes only such nicks,
        but with Redis the list is what the shared presence holds, and anything that
        writes there (another application, a peer writing the hash) may have put a name
        over 32 bytes, with spaces, or with an escape sequence for the asker's terminal:
        left out, and the asker told how many."""
        session.Send(proto.who_list(room, names))
        left_out = [n for n in names if not proto.valid_name(n)]
        if left_out:
            k = len(left_out)
            session.Send(proto.error(
                f"WHO {room}: {k} name{'s' if k != 1 else ''} left out (not nicks: 1 to "
                f"{proto.MAX_NAME_BYTES} bytes, printable, no spaces)"))
            if session.service is not None:
                self.log_burst(session, "WHO answers leaving names out").log(
                    logging.WARNING,
                    f"{k} names in the shared presence that are not nicks left out of "
                    f"a WHO of {room} (the first: {left_out[0]!r:.80}); written to Redis "
                    f"by something other than a chat server?")

    def gone(self, session: ChatSession) -> None:
        """The session ended: out of every room, and its nick is free again."""
        for name in sorted(session.rooms):
            self.leave(session, name)
        with self.lock:
            if self.nicks.get(session.nick) is session:
                del self.nicks[session.nick]


class ChatSession(iocpnet.PacketSession):
    handler = handler
    idle_timeout = 300.0           # a client silent for 5 minutes is gone

    def __init__(self, server: ChatServer) -> None:
        self.server = server
        self.nick = ""
        self.rooms: Set[str] = set()
        self.say_bucket = server.say_limit.bucket()
        self.query_bucket = server.query_limit.bucket()
        self.join_bucket = server.join_limit.bucket()

    def OnUpgrade(self, request: iocpnet.WebSocketRequest) -> Optional[iocpnet.HttpResponse]:
        """The --web-port listener: an upgrade (the page uses /ws) is the chat over
        WebSocket; a plain GET / is the page."""
        if request.is_websocket:
            return None
        if request.path in ("/", "/index.html") and not request.is_websocket:
            return iocpnet.HttpResponse(200, PAGE, "text/html; charset=utf-8")
        return iocpnet.HttpResponse(404, "not found\n")

    def OnConnected(self) -> None:
        self.nick = self.server.new_guest(self)
        self.Send(proto.welcome(self.nick))
        log.info("%s connected from %s", self.nick, self.address)

    def OnRecvPacket(self, packet_id: int, payload: bytes) -> None:
        try:
            handler.dispatch(self, packet_id, payload)
        except proto.ProtocolError as e:
            # A client bug, not ours: say why and drop it, without a traceback.
            self.server.log_burst(self, "malformed packets").log(
                logging.WARNING, f"{self.nick} sent a malformed packet {packet_id}: {e}")
            self.Disconnect(f"protocol error in packet {packet_id}: {e}")

    def OnDisconnected(self, reason: str) -> None:
        if self.nick:
            self.server.gone(self)
        log.info("%s disconnected: %s", self.nick or self.address, reason)

    def broadcast(self, packet: bytes, sessions: Iterable[iocpnet.Session]) -> int:
        """Queue one packet, by reference, to each of `sessions`."""
        service = self.service
        if service is None:           # not attached yet: nobody to reach
            return 0
        return int(service.Broadcast(packet, sessions=sessions))

    def reply_error(self, reason: Optional[str]) -> None:
        if reason is not None:
            self.Send(proto.error(reason))


@handler.route(proto.C_NICK)
def on_nick(session: ChatSession, payload: bytes) -> None:
    session.reply_error(session.server.rename(session, proto.Reader(payload).text()))


@handler.route(proto.C_JOIN)
def on_join(session: ChatSession, payload: bytes) -> None:
    session.reply_error(session.server.join(session, proto.Reader(payload).text()))


@handler.route(proto.C_LEAVE)
def on_leave(session: ChatSession, payload: bytes) -> None:
    session.reply_error(session.server.leave(session, proto.Reader(payload).text()))


@handler.route(proto.C_SAY)
def on_say(session: ChatSession, payload: bytes) -> None:
    r = proto.Reader(payload)
    room = r.str8()
    session.reply_error(session.server.say(session, room, r.text()))


@handler.route(proto.C_ROOMS)
def on_rooms(session: ChatSession, payload: bytes) -> None:
    proto.Reader(payload).end()
    session.server.rooms_list(session)


@handler.route(proto.C_WHO)
def on_who(session: ChatSession, payload: bytes) -> None:
    session.server.who(session, proto.Reader(payload).text())


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=11022, help="0: any free port")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--web-port", type=int, default=None,
                   help="also serve browsers on this port: the page at / and the chat "
                        "over WebSocket at /ws (0: any free port)")
    p.add_argument("--max-sessions", type=int, default=None,
                   help="refuse connections beyond this many live sessions")
    p.add_argument("--redis", metavar="URL", default=None,
                   help="share rooms with every chat server on this Redis "
                        "(redis://[[user]:password@]host:port/db, or rediss://)")
    p.add_argument("--reuse-port", action="store_true",
                   help="SO_REUSEPORT: several server processes share --port")
    p.add_argument("--say-rate", type=float, default=SAY_RATE,
                   help=f"messages a second one client may say, {SAY_BURST} at once "
                        f"(default {SAY_RATE:g}; 0: no limit, as a load test needs)")
    p.add_argument("--query-rate", type=float, default=QUERY_RATE,
                   help=f"WHO and ROOMS a second one client may ask, {QUERY_BURST} at "
                        f"once (default {QUERY_RATE:g}; 0: no limit)")
    p.add_argument("--join-rate", type=float, default=JOIN_RATE,
                   help=f"rooms a second one client may join, {JOIN_BURST} at once "
                        f"(default {JOIN_RATE:g}; 0: no limit)")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    core = iocpnet.IocpCore()
    backplane = None
    if args.redis:
        backplane = iocpnet.RedisBackplane(core, args.redis)
    server = ChatServer(backplane, say_rate=args.say_rate, query_rate=args.query_rate,
                        join_rate=args.join_rate)
    listener = iocpnet.Listener((args.host, args.port), reuse_port=args.reuse_port)
    service = iocpnet.Service(core, listener, server.session_factory, 100,
                              max_sessions=args.max_sessions)
    service.Start()
    web = None
    if args.web_port is not None:
        # Same sessions, same rooms; only the transport differs.  Closing the core
        # (when Run returns) stops this service too.
        web = iocpnet.Service(core, iocpnet.Listener((args.host, args.web_port),
                                                     websocket=True),
                              server.session_factory, 100, max_sessions=args.max_sessions)
        web.Start()
    # The port line goes to stdout, flushed, so that a script (or a test) can read the
    # port that --port 0 picked.
    print(f"chat server on {listener.address[0]}:{listener.port} ({core.backend}, "
          f"{args.workers} workers); Ctrl-C to stop", flush=True)
    if web is not None:
        print(f"web client on http://{web.listener.address[0]}:{web.listener.port}/",
              flush=True)
    if backplane is not None:
        backplane.Start()              # connects in the background; local until it has
        print(f"rooms shared through {backplane.address.display()} "
              f"(server {backplane.server_id})", flush=True)
    service.Run(workers=args.workers)          # returns after Ctrl-C or SIGTERM
    if backplane is not None:
        backplane.Close()
    print(f"stopped after {service.total_sessions} sessions", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
