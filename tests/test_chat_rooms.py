"""The chat example's rooms under a hostile client (attack round, session 9)."""
from iocpnet import chat_protocol as proto
from conftest import wait_for
from test_examples import chat, chat_connect, read_packets  # noqa: F401 (chat: a fixture)
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
