"""The game example's rooms under a careless or hostile client (attack round, session
9): a room lives while someone is in it or on the way in."""
import pytest

from iocpnet import game_protocol as proto
from conftest import wait_for
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
