"""The chat example's rooms under a hostile client (attack round, session 9)."""
import logging

import pytest

import iocpnet
from iocpnet import chat_protocol as proto
from conftest import assert_logged_per_burst, logged_per_burst, wait_for
from test_examples import chat, chat_burst_only, chat_connect, read_packets  # noqa: F401 (fixtures)
from subproc import load_example


def test_one_client_cannot_make_rooms_without_end(chat):
    # One client joining made-up room names made a Group per name, kept while it stayed
    # (1.3 KiB each: 20,000 joins took the server from 24 to 50 MiB), and on a shared
    # server a Redis subscription each.  A client is in at most MAX_ROOMS_PER_SESSION
    # rooms; past it a join is refused with an error, and the client goes on.
    limit = getattr(load_example("chat_server"), "MAX_ROOMS_PER_SESSION", 64)
    a, _ = chat_connect(chat)
    with a:
        for i in range(limit):
            a.sendall(proto.join(f"room-{i}"))
            read_packets(a, 2)                              # joined, who
        a.sendall(proto.join("one-too-many"))
        (err,) = read_packets(a, 1)
        assert err[0] == proto.S_ERROR and b"rooms already" in err[1], err
        a.sendall(proto.leave("room-0") + proto.join("one-too-many"))
        read_packets(a, 1)                                  # left room-0
        assert [p[0] for p in read_packets(a, 2)] == [proto.S_JOINED, proto.S_WHO]
    wait_for(lambda: chat.service.session_count == 0, message="the session to end")


def _read_until_cut(sock):
    """Every packet a flooding client gets until the server cuts it (its socket ends:
    the server may reset it, with our sends unread); the first error says 'too fast'."""
    got = []
    try:
        while True:
            got += read_packets(sock, 1)
    except (ConnectionError, AssertionError, EOFError, OSError):
        pass
    errors = [p for i, p in got if i == proto.S_ERROR]
    assert errors and b"too fast" in errors[0], got[-3:]
    return got


def _flood_is_cut(sock, flood, answer, burst):
    """Send a flood of requests at once: the server does at most its burst of them
    (`answer` packets), then refuses and cuts the client (_read_until_cut)."""
    sock.sendall(flood)
    done = sum(i == answer for i, _ in _read_until_cut(sock))
    assert done <= burst, f"{done} requests done (burst {burst})"


def test_a_client_flooding_a_room_is_slowed_then_cut(chat_burst_only):
    # Each SAY is sent to every member of the room: one client saying 300 things at
    # once made 300 deliveries per member (x the room's size in all), and members that
    # read slowly were the ones cut, by their send queue limit.  Past a burst a SAY is
    # refused with an error; a client that keeps on regardless is disconnected.  The
    # server's bucket refills too slowly to count here: the bounds are the burst's.
    chat = chat_burst_only
    mod = load_example("chat_server")
    burst = getattr(mod, "SAY_BURST", 20)
    (a, nick_a), (b, _) = chat_connect(chat), chat_connect(chat)
    with a, b:
        a.sendall(proto.join("lobby"))
        read_packets(a, 2)
        b.sendall(proto.join("lobby"))
        read_packets(b, 2)
        read_packets(a, 1)                                  # b joined
        _flood_is_cut(a, b"".join(proto.say("lobby", f"spam {k}") for k in range(300)),
                      proto.S_SAID, burst)
        b.sendall(proto.say("lobby", "still here"))
        heard = []
        while not heard or heard[-1] != "still here":
            (pid, payload), = read_packets(b, 1)
            if pid == proto.S_SAID:
                r = proto.Reader(payload)
                r.str8()
                r.str8()
                heard.append(r.text())
        assert len(heard) <= burst + 1, len(heard)           # the burst, then b's own
    wait_for(lambda: chat.service.session_count == 0, message="the sessions to end")


@pytest.mark.parametrize("ask", ["who", "rooms"])
def test_a_client_asking_who_or_rooms_without_end_is_slowed_then_cut(chat_burst_only, ask):
    # SAY is limited, WHO and ROOMS were not: each answer lists a whole room (or every
    # room), so a client asking again and again made the server build and send that
    # list as fast as the client could ask.  They share a bucket of their own, with the
    # SAY limit's behaviour: past a burst an error, and past a burst of errors the cut.
    chat = chat_burst_only
    mod = load_example("chat_server")
    burst = getattr(mod, "QUERY_BURST", 20)
    (a, _), (b, _) = chat_connect(chat), chat_connect(chat)
    with a, b:
        a.sendall(proto.join("lobby"))
        read_packets(a, 2)
        request = proto.who("lobby") if ask == "who" else proto.rooms()
        answer = proto.S_WHO if ask == "who" else proto.S_ROOMS
        _flood_is_cut(a, request * 300, answer, burst)
        b.sendall(request)                                  # b is not limited by a
        assert [p[0] for p in read_packets(b, 1)] == [answer]
    wait_for(lambda: chat.service.session_count == 0, message="the sessions to end")


def test_a_client_joining_and_leaving_without_end_is_slowed_then_cut(chat_burst_only):
    # A join tells every member of the room and answers with the member list, and the
    # leave after it tells them again: a client joining and leaving a big room in a loop
    # made the server do that as fast as it could ask (the members' sockets flooded).
    # JOIN has a bucket of its own, with the SAY limit's behaviour: past a burst an
    # error, past a burst of errors the cut.  A member hears at most the burst.
    # (Normal use: a client filling its 64 rooms at once, test_one_client_cannot_make_
    # rooms_without_end, on the default limits, is within the burst.)
    chat = chat_burst_only
    burst = getattr(load_example("chat_server"), "JOIN_BURST", 128)
    (a, _), (b, _) = chat_connect(chat), chat_connect(chat)
    with a, b:
        b.sendall(proto.join("lobby"))
        read_packets(b, 2)
        _flood_is_cut(a, (proto.join("lobby") + proto.leave("lobby")) * 300, proto.S_JOINED,
                      burst)
        # b heard a's joins and leaves (the burst's), then hears its own: not cut.
        b.sendall(proto.leave("lobby") + proto.join("lobby"))
        heard = []
        while heard[-2:] != [proto.S_JOINED, proto.S_WHO]:
            heard += [pid for pid, _ in read_packets(b, 1)]
        assert heard.count(proto.S_JOINED) <= burst + 1, len(heard)
    wait_for(lambda: chat.service.session_count == 0, message="the sessions to end")


def test_clients_cut_for_malformed_packets_or_floods_are_logged_once_per_burst(
        chat_burst_only, caplog):
    # Each client cut for a malformed packet, or for a flood past its burst of
    # refusals, wrote a WARNING: a client reconnecting to do it again made one line per
    # connection.  Each is still cut; the log has a burst's first lines and a count.
    caplog.set_level(logging.WARNING, logger="chat_server")   # not its INFO lines
    chat = chat_burst_only
    burst = getattr(load_example("chat_server"), "QUERY_BURST", 20)
    n = 30
    for _ in range(n):
        a, _ = chat_connect(chat)
        with a:
            a.sendall(iocpnet.make_packet(proto.C_SAY, b"\x09lob"))   # str8 past the end
            _read_to_end(a)
        b, _ = chat_connect(chat)
        with b:
            b.sendall(proto.rooms() * (2 * burst + 10))
            _read_to_end(b)
    wait_for(lambda: chat.service.session_count == 0, message="the sessions to end")
    full, counts, total = logged_per_burst(caplog, "malformed packets",
                                           r"sent a malformed packet 4: ")
    assert_logged_per_burst(full, counts, total, n)
    full, counts, total = logged_per_burst(caplog, "flooders cut",
                                           r"disconnected: flooding: ")
    assert_logged_per_burst(full, counts, total, n)


def _read_to_end(sock):
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass
