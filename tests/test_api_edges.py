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


# ---- calls after the end -------------------------------------------------------------------
#
# One rule per kind (guide, section 2, "After the end"):
# - work handed to a session or a group that has ended (Send, Post, Broadcast, Add, ...)
#   answers False / 0 / a Timer or Task already cancelled: it can end at any moment on
#   another thread, so the caller cannot avoid the race (the C++ original's Send);
# - starting work on a closed core or a stopped service (Start, Connect, core.Post,
#   CallLater, Spawn) is a RuntimeError that says what is closed: the caller ended it;
# - ending again (Close, Stop, Disconnect, Abort, Remove) does nothing.

async def _nothing():
    return None


def _assert_owner_refuses_quietly(owner):
    coro = _nothing()
    try:
        assert owner.Post(print) is False
        for timer in (owner.CallLater(1, print), owner.CallEvery(1, print)):
            assert timer.cancelled and not timer.active
        task = owner.Spawn(coro)
        assert task.cancelled()
    finally:
        coro.close()


def test_an_ended_session_and_a_closed_group_answer_false(server):
    srv = server(Member)
    sock = connect(srv.address)
    wait_for(lambda: srv.service.session_count == 1)
    (session,) = srv.service.sessions
    room = iocpnet.Group(srv.core, "room")
    assert room.Add(session)
    assert session.Disconnect("bye") is True
    sock.close()
    wait_for(lambda: srv.service.session_count == 0)
    assert session.Send(b"x") is False
    assert session.Disconnect() is False and session.Abort() is False
    _assert_owner_refuses_quietly(session)
    assert room.Add(session) is False           # ended: it joins nothing

    other = connect(srv.address)
    try:
        wait_for(lambda: srv.service.session_count == 1)
        (alive,) = srv.service.sessions
        room.Close()
        room.Close()                            # again: nothing
        # A group closed on another thread while a player's join is under way: the
        # join answers False, as for an ended player (it raised RuntimeError).
        assert room.Add(alive) is False and alive not in room
        assert room.Broadcast(b"x") == 0 and room.Remove(alive) is False
        _assert_owner_refuses_quietly(room)
        assert alive.Send(b"still\n") is True   # the session itself goes on
    finally:
        other.close()


def test_a_closed_core_and_a_stopped_service_raise_runtime_error(backend):
    core = iocpnet.IocpCore(backend)
    service = iocpnet.Service(core, ("127.0.0.1", 0), Member, 1)
    client = iocpnet.ClientService(core, ("127.0.0.1", 9), Member, 0)
    client.Start()
    client.Stop(5)
    # A stopped client service connects no more (it said "the service is stopping").
    with pytest.raises(RuntimeError, match=r"^ClientService is stopped: it makes no more "
                                           r"connections \(make a new one\)$"):
        client.Connect()
    with pytest.raises(RuntimeError, match="stopped service cannot start again"):
        client.Start()
    client.Stop(5)                               # again: nothing
    core.Close()
    coro = _nothing()
    try:
        # Each of these was OSError('...: completion port is closed') or RuntimeError.
        with pytest.raises(RuntimeError, match=r"^Post: the IocpCore is closed$"):
            core.Post(print)
        for call in (lambda: core.CallLater(1, print), lambda: core.CallEvery(1, print),
                     lambda: core.Spawn(coro)):
            with pytest.raises(RuntimeError, match="the IocpCore is closed"):
                call()
        with pytest.raises(RuntimeError, match=r"^listening on \('127.0.0.1', 0\): "
                                               r"the IocpCore is closed$"):
            service.Start()
        fresh = iocpnet.ClientService(core, ("127.0.0.1", 9), Member, 0)
        with pytest.raises(RuntimeError, match=r"^connect: the IocpCore is closed$"):
            fresh.Connect()
    finally:
        coro.close()
    assert core.Dispatch(0) == -1                # a worker's loop ends
    core.Close()                                 # again: nothing
    service.Stop(1)


def test_an_owner_s_timers_and_tasks_on_a_closed_core_come_back_cancelled(backend):
    """A session or a group ends with its core: a timer or a task it asks for then comes
    back cancelled, as after its own end, where it raised RuntimeError('the IocpCore is
    closed') (a group's Post answered False meanwhile).  The case a careless user meets:
    an OnDisconnected that schedules something, run by core.Close()."""
    got = []

    class Scheduling(iocpnet.Session):
        def OnDisconnected(self, reason):
            coro = _nothing()
            try:
                got.append(self.CallLater(1, print))
                got.append(self.Spawn(coro))
            except Exception as e:
                got.append(e)
            finally:
                coro.close()

    core = iocpnet.IocpCore(backend)
    service = iocpnet.Service(core, ("127.0.0.1", 0), Scheduling, 1)
    service.Start()
    sock = connect(("127.0.0.1", service.listener.port))
    try:
        deadline = 0
        while service.session_count < 1 and deadline < 1000:
            core.Dispatch(10)
            deadline += 1
        group = iocpnet.Group(core, "room")
        core.Close()
        assert len(got) == 2, got
        assert got[0].cancelled and not got[0].active, got
        assert got[1].cancelled(), got
        _assert_owner_refuses_quietly(group)
    finally:
        sock.close()
        # The class's method keeps `got` (its closure), and on free-threaded 3.13 a
        # class made while threads ran is never freed: the Timer and Task in it would
        # keep the core alive after the test.
        got.clear()
