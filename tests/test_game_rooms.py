"""The game example's rooms under a careless or hostile client (attack round, session
9): a room lives while someone is in it or on the way in."""
import threading

import pytest

import iocpnet
from iocpnet import game_protocol as proto
from conftest import connect, wait_for
from test_game_example import login, read_until, running_game


@pytest.fixture
def game(backend):
    """The example's server in-process, with its stand-in database (no Redis)."""
    with running_game(backend) as view:
        yield view


def test_an_empty_room_is_closed_and_a_login_racing_its_close_is_welcomed(game):
    # Every login to a new room name made a Room, with its 20 Hz tick, kept for good:
    # a client logging into made-up names (then leaving) left a ticking room behind
    # each, the server's CPU and memory growing with every login.  An empty room nobody
    # is on the way into is closed now; one a login is heading for is not.
    for i in range(20):
        c, _, _ = login(game, "visitor", f"made-up-{i}")
        c.close()
    wait_for(lambda: not game.world.rooms, 10,
             f"the empty rooms closed (left: {sorted(game.world.rooms)})")
    for i in range(20):                 # the last one leaves as the next logs in
        a, _, _ = login(game, "first", "busy")
        a.close()
        b, pb, _ = login(game, "second", "busy")     # welcomed: the room took it in
        assert proto.parse_joined(read_until(b, proto.S_JOINED)) == (pb, "second")
        b.close()
    wait_for(lambda: not game.world.rooms, 10, "the last room closed")


def test_a_tick_with_more_moves_than_one_packet_holds_loses_none(game):
    """A tick's S_MOVES carries 16 bytes per move, so at most 4095 moves fit one packet
    (65535 bytes).  Six players each sending a burst of 700 moves (under the flood
    limit: 800 at once) made one tick's 4200: make_packet raised in the room's tick,
    after it had taken the pending moves, so every player's moves of that tick were
    lost (none echoed, positions moved nevertheless), the "never dropped" of S_MOVES.
    Every move must come back, in order, each once."""
    vic, pv, _ = login(game, "vic", "crowd")
    movers = [login(game, f"m{i}", "crowd") for i in range(6)]
    room = game.world.room("crowd")
    game.world.arrived(room)                # room() counted us as arriving: undo
    # The room ticks by hand here, once every move is pending, so that they surely
    # fall in one tick.
    room.ticker.Cancel()
    burst = b"".join(iocpnet.make_packet(proto.C_MOVE, proto.move(seq, 1, 0))
                     for seq in range(1, 701))
    for c, _, _ in movers:
        c.sendall(burst)
    vic.sendall(iocpnet.make_packet(proto.C_MOVE, proto.move(1, 0, 1)))
    expected = 6 * 700 + 1
    wait_for(lambda: len(room.pending) == expected, 10, "every move pending")
    room.Post(room.on_tick)
    seen = {}
    vic.settimeout(10)
    while sum(len(v) for v in seen.values()) < expected:
        _, applied = proto.parse_moves(read_until(vic, proto.S_MOVES, limit=1000))
        for pid, seq, _, _ in applied:
            seen.setdefault(pid, []).append(seq)
    assert seen[pv] == [1]
    assert sorted(len(v) for v in seen.values()) == [1] + [700] * 6
    assert all(v == list(range(1, 701)) for pid, v in seen.items() if pid != pv)
    vic.close()
    for c, _, _ in movers:
        c.close()


def test_a_full_room_refuses_a_login_and_its_tick_fits_a_packet(game):
    """A room took any number of players: each tick sends every member every position
    (12 bytes each), so bots crowding one room made its cost grow with the square of
    its size, and from 5461 players on S_STATE no longer fit a packet: make_packet
    raised in the tick, every tick, and nobody in the room heard a position again.  A
    room holds max_players (a login past it hears "room full" and is cut), and that
    many positions fit one S_STATE, and their ids one S_ROSTER."""
    room_cls = type(game.world.room("full"))
    game.world.arrived(game.world.room("full"))      # room() counted us twice: undo
    game.world.arrived(game.world.room("full"))
    limit = room_cls.max_players
    assert 0 < limit and 4 + 6 + 12 * limit <= 0xFFFF and 4 + 2 + 4 * limit <= 0xFFFF
    room = game.world.rooms["full"]
    room.max_players = 2
    a, pa, _ = login(game, "ann", "full")
    b, pb, _ = login(game, "bob", "full")
    c = connect(("127.0.0.1", game.port))
    c.sendall(iocpnet.make_packet(proto.C_LOGIN, proto.login("cal", "full")))
    assert read_until(c, proto.S_ERROR) == b"room full"
    c.settimeout(10)
    assert c.recv(1) == b""
    while True:                         # ticks from before bob joined list ann alone
        _, positions = proto.parse_state(read_until(a, proto.S_STATE))
        pids = sorted(pid for pid, _, _ in positions)
        if pids != [pa]:
            break
    assert pids == sorted([pa, pb])
    for s in (a, b, c):
        s.close()


def test_players_flooding_a_busy_room_do_not_cut_the_others(game):
    """Every move is a job Post()ed to the room, and a room's strand held at most 10000
    waiting jobs, shared by every player: thirteen players each sending a burst of 780
    moves (within the flood limit, 800 at once) while the room was busy (a long tick)
    filled it, and Post raised queue.Full in the OnRecvPacket of whoever moved next,
    a quiet player too, who was cut ("OnRecvPacket raised").  The room's bound now holds
    every player's burst.  The room's strand is held while the moves arrive."""
    vic, pv, _ = login(game, "vic", "busy")
    movers = [login(game, f"m{i}", "busy") for i in range(13)]
    room = game.world.room("busy")
    game.world.arrived(room)                # room() counted us as arriving: undo
    gate, held = threading.Event(), threading.Event()

    def hold():
        held.set()
        gate.wait(20)

    # Sent once the hold runs: a completion that came in the same batch as the hold
    # waits with it (its worker is blocked), and the bursts must not be among them.
    room.Post(hold)
    assert held.wait(10), "the room's strand held"
    burst = b"".join(iocpnet.make_packet(proto.C_MOVE, proto.move(seq, 1, 0))
                     for seq in range(1, 781))
    try:
        before = game.service.stats()["messages_in"]
        for c, _, _ in movers:
            c.sendall(burst)
        expected = 13 * 780
        wait_for(lambda: game.service.stats()["messages_in"] - before >= expected or
                 game.service.session_count < 14, 15, "the bursts received")
        assert game.service.session_count == 14, "a player was cut"
        vic.sendall(iocpnet.make_packet(proto.C_MOVE, proto.move(1, 0, 1)))
        wait_for(lambda: game.service.stats()["messages_in"] - before > expected, 10,
                 "the quiet player's move received")
    finally:
        gate.set()
    vic.settimeout(20)
    while True:
        _, applied = proto.parse_moves(read_until(vic, proto.S_MOVES, limit=10_000))
        if (pv, 1) in [(pid, seq) for pid, seq, _, _ in applied]:
            break
    assert game.service.session_count == 14
    vic.close()
    for c, _, _ in movers:
        c.close()
