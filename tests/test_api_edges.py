"""The public objects at their edges, as a careless user meets them: a copy or a pickle of
an object that stands for native state, and every public call on a closed core, a
stopped service, an ended session, a closed group.  Each case is what such a user writes
in a line or two; each answered in a different way (or not at all) before."""
import copy
import pickle

import pytest

import iocpnet
from conftest import connect, wait_for


class Member(iocpnet.Session):
    pass


# ---- copies and pickles --------------------------------------------------------------------

COPIES = {
    "copy.copy": copy.copy,
    "copy.deepcopy": copy.deepcopy,
    "pickle.dumps": pickle.dumps,
}


def _each_copy_refused(obj, kind):
    for how, do in COPIES.items():
        with pytest.raises(TypeError, match=rf"^{kind} cannot be copied or pickled: "):
            do(obj)


def test_copying_or_pickling_an_object_with_native_state_is_refused(server):
    """copy.copy(service), copy.deepcopy(session), pickle.dumps(core): each made a second
    object sharing the first one's native state (its port, its socket, its strand), or
    failed deep inside with whatever Cython's pickling said.  Each is a TypeError that
    says why, for the classes and for a user's subclass of them."""
    srv = server(Member)
    sock = connect(srv.address)
    try:
        wait_for(lambda: srv.service.session_count == 1)
        (session,) = srv.service.sessions
        group = iocpnet.Group(srv.core, "room")
        group.Add(session)

        class Room(iocpnet.Group):
            pass

        room = Room(srv.core, "room 2")
        client = iocpnet.ClientService(srv.core, srv.address, Member, 0)
        _each_copy_refused(srv.core, "IocpCore")
        _each_copy_refused(srv.service, "Service")
        _each_copy_refused(client, "ClientService")
        _each_copy_refused(srv.listener, "Listener")
        _each_copy_refused(session, "Member")
        _each_copy_refused(iocpnet.Session(), "Session")        # not connected yet
        _each_copy_refused(iocpnet.PacketSession(), "PacketSession")
        _each_copy_refused(group, "Group")
        _each_copy_refused(room, "Room")
        _each_copy_refused(iocpnet.LogBurst(srv.core, "things"), "LogBurst")
        timer = srv.core.CallLater(60, print)
        _each_copy_refused(timer, "Timer")
        timer.Cancel()
        # Nothing was harmed: the session is still connected and still a member.
        assert session.connected and session in group and len(room) == 0
        group.Close()
        room.Close()
    finally:
        sock.close()

