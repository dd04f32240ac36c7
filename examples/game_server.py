"""A game server with rooms, a 20 Hz tick, moves, chat and an awaited login.

    python examples/game_server.py --port 11023 [--redis 127.0.0.1:6379]
    python -m iocpnet dummy-client --protocol game --port 11023 --clients 50

The protocol is documented in ``iocpnet.game_protocol``, shared with the load client.
There is no lock in this file: every piece of state belongs to one strand.

What to look at:

- ``Player.OnRecvPacket(C_LOGIN)``: the login awaits a lookup with ``Spawn`` (in Redis
  with ``--redis``, else in a small asynchronous stand-in for a database).  No worker
  waits for it: the coroutine runs on the core's asyncio loop thread, and
  ``Player.on_login`` runs later, back on the player's strand.
- ``Room`` is an ``iocpnet.Group``: its members, its strand and its 20 Hz tick
  (``CallEvery``).  A move is *posted* to the room (``room.Post(room.on_move, ...)``),
  so the room's state (positions, pending moves) is only ever touched on the room's
  strand: no lock.  The tick broadcasts the moves it applied (never dropped) and the
  positions (``droppable=True``: a player whose send queue is backed up misses some).
- Chat is broadcast straight from the sender's hook: ``Group.Broadcast`` may be called
  from any thread, and every member hears the room's messages in one order.
- ``OnSendQueue`` tells when a player stops keeping up, and when it has caught up.
- A player who disconnects leaves its room by itself (before ``OnDisconnected``); the
  room learns it on its strand from a posted job.
- Flood protection as class attributes (``recv_messages_per_second``...): a client
  that floods is cut with a clear reason; ``--metrics-port`` serves ``service.stats()``
  to Prometheus (``pip install iocpnet[metrics]``).
- ``service.Start(workers=...)`` returns a run handle at once; the main thread waits
  for Ctrl-C or SIGTERM, then ``handle.Stop()``.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import itertools
import logging
import signal
import sys
import threading
from types import FrameType
from typing import Any, Dict, List, Optional, Sequence, Tuple

import iocpnet
from iocpnet import game_protocol as proto

log = logging.getLogger("game_server")

TICK_HZ = 20
WORLD = 10_000                 # positions wrap at +-WORLD
BURST = 800                    # packets a player may send at once (its flood limit)


class Database:
    """Where a login looks the player up: Redis (``redis.asyncio``) when an address is
    given, else a stand-in that answers after a short await, as a real one would."""

    def __init__(self, redis_address: Optional[Tuple[str, int]] = None) -> None:
        self.redis_address = redis_address
        self.fake: Dict[str, int] = {}
        self._client: Any = None         # made on the loop thread, used only there

    async def level_of(self, name: str) -> int:
        if self.redis_address is None:
            await asyncio.sleep(0.005)
            return self.fake.setdefault(name, 1 + len(name) % 50)
        if self._client is None:
            # Imported only when asked for (the redis package is optional here).
            redis_asyncio: Any = importlib.import_module("redis.asyncio")
            host, port = self.redis_address
            self._client = redis_asyncio.Redis(host=host, port=port)
        key = f"player:{name}"
        level = await self._client.hget(key, "level")
        if level is None:
            await self._client.hsetnx(key, "level", 1)
            return 1
        return int(level)


class Room(iocpnet.Group):
    """A room: members (the Group), positions and pending moves (on its strand only).
    It lives while someone is in it or on the way in (``arriving``, under the world's
    lock): a client logging into made-up room names must not leave a ticking room
    behind each.  It holds ``max_players``: each tick sends every member every
    position, so its cost grows with the square of the room (bots crowding one room
    made it quadratic), and past 5460 players S_STATE no longer fits a packet (the
    tick failed at each turn, for everyone)."""

    max_players = 1000
    # Every move is a job on the room's strand, and the bound on jobs waiting there is
    # the room's, shared: it holds every player's burst, so that players flooding a busy
    # room meet their own flood limit, and a quiet player never meets queue.Full.
    post_queue_limit = max_players * BURST

    def __init__(self, world: World, name: str) -> None:
        super().__init__(world.core, name)
        self.world = world
        self.arriving = 0                   # logins given this room, not yet joined
        self.room_name = name
        self.tick = 0
        self.positions: Dict[int, List[int]] = {}      # player id -> [x, y]
        self.pending: List[Tuple[int, int, int, int]] = []
        self.ticker = self.CallEvery(1.0 / TICK_HZ, self.on_tick)

    # Everything below runs on the room's strand, one at a time.

    def on_join(self, player: Player, level: int) -> None:
        self.world.arrived(self)
        if len(self.positions) >= self.max_players:
            player.refuse("room full")
            return
        if not self.Add(player):
            return                          # cut before its welcome: no one hears of it
        self.positions[player.player_id] = [0, 0]
        # The welcome comes from here, once the player is in: a player that was
        # welcomed is heard joining, and its leave (posted by OnDisconnected, so run
        # after this) is heard too.  Sent before the join, a player cut in between
        # had been welcomed yet was never in the room, and no one heard it leave.
        player.Send(iocpnet.make_packet(proto.S_WELCOME, proto.welcome(
            player.player_id, level, TICK_HZ, self.room_name)))
        player.Send(iocpnet.make_packet(proto.S_ROSTER, proto.roster(
            [pid for pid in self.positions if pid != player.player_id])))
        self.Broadcast(iocpnet.make_packet(proto.S_JOINED,
                                           proto.joined(player.player_id, player.name)))

    def on_leave(self, player_id: int) -> None:
        if self.positions.pop(player_id, None) is not None:
            self.Broadcast(iocpnet.make_packet(proto.S_LEFT, proto.left(player_id)))
        if not self.positions:
            self.world.forget_if_empty(self)

    def on_move(self, player_id: int, seq: int, dx: int, dy: int) -> None:
        self.pending.append((player_id, seq, dx, dy))

    def on_tick(self) -> None:
        self.tick += 1
        applied = []
        for pid, seq, dx, dy in self.pending:
            pos = self.positions.get(pid)
            if pos is None:
                continue                    # left before this tick
            pos[0] = (pos[0] + dx + WORLD) % (2 * WORLD) - WORLD
            pos[1] = (pos[1] + dy + WORLD) % (2 * WORLD) - WORLD
            applied.append((pid, seq, pos[0], pos[1]))
        self.pending = []
        # Six players' bursts (800 moves each, within the flood limit) fill more than
        # one packet: in pieces, in order.
        for i in range(0, len(applied), proto.MOVES_PER_PACKET):
            self.Broadcast(iocpnet.make_packet(proto.S_MOVES, proto.moves(
                self.tick, applied[i:i + proto.MOVES_PER_PACKET])))
        self.Broadcast(iocpnet.make_packet(proto.S_STATE, proto.state(
            self.tick, [(pid, x, y) for pid, (x, y) in self.positions.items()])),
            droppable=True)


class World:
    """The rooms, made on first use.  The dict is shared by every player's login (on
    their own strands): one lock around it, held for a lookup."""

    def __init__(self, core: iocpnet.IocpCore, db: Database) -> None:
        self.core = core
        self.db = db
        self.rooms: Dict[str, Room] = {}
        self.lock = threading.Lock()
        self.ids = itertools.count(1)

    def room(self, name: str) -> Room:
        """The room a login is heading for (counted as arriving until it joins)."""
        with self.lock:
            room = self.rooms.get(name)
            if room is None:
                room = self.rooms[name] = Room(self, name)
            room.arriving += 1
            return room

    def arrived(self, room: Room) -> None:
        with self.lock:
            room.arriving -= 1

    def forget_if_empty(self, room: Room) -> None:
        """On the room's strand, once it is empty: closed (its tick stops) unless a
        login is on its way in.  Every player given the room has its leave posted
        after its join, so the last one's leave finds it empty."""
        with self.lock:
            if room.arriving or self.rooms.get(room.room_name) is not room:
                return
            del self.rooms[room.room_name]
        room.Close()

    def close(self) -> None:
        with self.lock:
            rooms, self.rooms = list(self.rooms.values()), {}
        for room in rooms:
            room.Close()


class Player(iocpnet.PacketSession):
    """One connection: login, then moves and chat in its room."""

    max_packet_size = 1024
    send_queue_high = 256 * 1024
    idle_timeout = 60.0
    # A player sends a few dozen packets a second; ten times that is a flood.
    recv_messages_per_second = 400
    recv_messages_burst = BURST
    recv_bytes_per_second = 64 * 1024
    recv_bytes_burst = 128 * 1024

    def __init__(self, world: World) -> None:
        self.world = world
        self.player_id = 0
        self.name = ""
        self.room: Optional[Room] = None
        self.logging_in = False
        self.behind = False

    def OnRecvPacket(self, packet_id: int, payload: bytes) -> None:
        try:
            if packet_id == proto.C_LOGIN:
                self.login(*proto.parse_login(payload))
            elif packet_id == proto.C_MOVE:
                seq, dx, dy = proto.parse_move(payload)
                room = self.need_room()
                room.Post(room.on_move, self.player_id, seq, dx, dy)
            elif packet_id == proto.C_CHAT:
                seq, text = proto.parse_chat(payload)
                self.need_room().Broadcast(iocpnet.make_packet(
                    proto.S_CHAT, proto.chat_heard(self.player_id, seq, text)))
            else:
                self.refuse(f"unknown packet id {packet_id}")
        except proto.ProtocolError as e:
            self.refuse(str(e))

    def login(self, name: str, room: str) -> None:
        if self.logging_in or self.room is not None:
            self.refuse("already logged in")
            return
        self.logging_in = True
        self.name = name
        self.Spawn(self.world.db.level_of(name), lambda task: self.on_login(task, room))

    def on_login(self, task: iocpnet.Task[int], room_name: str) -> None:
        level = task.result()               # a lookup that failed ends the session
        self.player_id = next(self.world.ids)
        room = self.room = self.world.room(room_name)
        room.Post(room.on_join, self, level)    # the room welcomes it

    def need_room(self) -> Room:
        if self.room is None:
            raise proto.ProtocolError("not logged in")
        return self.room

    def refuse(self, why: str) -> None:
        self.Send(iocpnet.make_packet(proto.S_ERROR, proto.error(why)))
        self.Disconnect(f"protocol error: {why}")

    def OnSendQueue(self, high: bool) -> None:
        self.behind = high
        log.info("%s %s", self.name or self, "falls behind" if high else "caught up")

    def OnDisconnected(self, reason: str) -> None:
        # Already out of the room (the Group took it out); the room's state is the
        # room's: tell it on its strand.
        if self.room is not None:
            self.room.Post(self.room.on_leave, self.player_id)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=11023, help="0: any free port")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--redis", default=None, metavar="HOST:PORT",
                   help="look players up in Redis (needs the redis package)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on 127.0.0.1:PORT (iocpnet[metrics])")
    p.add_argument("--max-per-address", type=int, default=None,
                   help="live sessions per remote address at most")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    redis_address = None
    if args.redis:
        host, _, port = args.redis.rpartition(":")
        redis_address = (host or "127.0.0.1", int(port))
    stop = threading.Event()

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    core = iocpnet.IocpCore()
    world = World(core, Database(redis_address))
    service = iocpnet.Service(core, iocpnet.Listener((args.host, args.port)),
                              lambda: Player(world), 100,
                              max_sessions_per_address=args.max_per_address)
    run = service.Start(workers=args.workers)
    if args.metrics_port is not None:
        metrics = service.ServeMetrics(args.metrics_port)
        print(f"metrics on http://127.0.0.1:{metrics.port}/metrics", flush=True)
    # The port line goes to stdout, flushed: a script (or a test) reads the port that
    # --port 0 picked.
    print(f"game server on {run.address[0]}:{run.port} ({core.backend}, "
          f"{args.workers} workers, {TICK_HZ} Hz); Ctrl-C to stop", flush=True)
    while not stop.wait(0.25):
        pass
    world.close()
    run.Stop()
    stats = service.stats()
    print(f"stopped after {service.total_sessions} sessions; "
          f"{stats['messages_in']:,} messages in, {stats['messages_out']:,} out; "
          f"disconnects: {stats['disconnects']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
