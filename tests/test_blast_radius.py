"""One session's bug stays that session's (attack round, session 9): a member of a room
that misbehaves must not end, or silence, the others."""
import iocpnet
from conftest import connect, recv_exactly, wait_for


class Member(iocpnet.Session):
    """Joins the room its class names; what it receives it broadcasts to the room."""
    room = None

    def OnConnected(self):
        type(self).room.Add(self)

    def OnRecv(self, data):
        type(self).room.Broadcast(bytes(data))

    def OnDisconnected(self, reason):
        type(self).ended.append(reason)


class Touchy(Member):
    """A member whose overridden Send has a bug."""

    def Send(self, data):
        raise RuntimeError("a bug in an overridden Send")


def test_a_member_whose_send_raises_costs_the_broadcaster_and_the_others_nothing(
        server, caplog_iocpnet):
    # A local Broadcast let a member's Send exception unwind into the caller: the
    # broadcaster's OnRecv failed (it was disconnected, for another session's bug) and
    # the members after the faulty one never heard the message.  A shared group's
    # delivery already logged it and went on; a local one does the same now.
    made = []
    Member.ended = []

    def factory():            # the first session is Touchy, the rest good members
        made.append(1)
        return Touchy() if len(made) == 1 else Member()

    srv = server(factory, accepts=1)
    room = Member.room = iocpnet.Group(srv.core, "room")
    try:
        touchy = connect(srv.address)
        wait_for(lambda: len(room) == 1, 10, "the touchy member joined")
        members = [connect(srv.address) for _ in range(3)]
        wait_for(lambda: len(room) == 4, 10, "3 more members")
        members[0].sendall(b"hello")
        for c in members:
            assert recv_exactly(c, 5) == b"hello"
        members[2].sendall(b"again")
        for c in members:
            assert recv_exactly(c, 5) == b"again"
        assert Member.ended == [], Member.ended
        assert len(room) == 4
        logged = [r for r in caplog_iocpnet.records if "raised during" in r.getMessage()]
        assert len(logged) == 2 and "<Touchy" in logged[0].getMessage(), \
            [r.getMessage() for r in logged]
        for c in [touchy] + members:
            c.close()
        wait_for(lambda: len(Member.ended) == 4, 10, "4 ends")
    finally:
        room.Close()
        Member.room = None
