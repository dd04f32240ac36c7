"""The dummy client against a server that never answers (attack round, session 9): each
client's error says what it was waiting for."""
from conftest import Server
from test_cli import dummy_client

import iocpnet


class Silent(iocpnet.Session):
    def OnRecv(self, data):
        pass                    # reads everything, answers nothing


def test_game_bots_of_a_silent_server_say_they_got_no_answer_to_their_login(backend):
    # The game bots said "no answer to its waiting for its room to fill": they had not
    # even been welcomed (their login went unanswered).
    srv = Server(Silent, backend).start()
    try:
        rc, out = dummy_client(backend, srv.port, "--protocol", "game", "--clients", 2,
                               "--room-size", 2, "--seconds", 0.5, "--grace", 0.5)
    finally:
        srv.stop()
    assert rc == 1, out
    assert out.count("no answer to its login within 0.5 s of the end") == 2, out
