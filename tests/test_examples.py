"""The examples run as a user runs them: the original's echo server, and the chat
server with three scripted clients; the chat server's rules in-process; the chat
protocol's encodings."""
import re
import signal
import types

import pytest

import iocpnet
from iocpnet import chat_protocol as proto
import packet_reference as ref

from conftest import connect, recv_exactly, recv_until_eof, wait_for
from subproc import EXAMPLES, Proc, load_example


def read_packets(sock, n):
    out = []
    for _ in range(n):
        header = recv_exactly(sock, 4)
        size = header[0] | header[1] << 8
        out.append((header[2] | header[3] << 8, recv_exactly(sock, size - 4)))
    return out


# ---- the echo server, one to one with the original ----

def test_echo_server_example(backend):
    with Proc.python(EXAMPLES / "echo_server.py", "--port", "0", backend=backend) as srv:
        port = srv.port(r"echo server on port (\d+)")
        for i in range(3):
            with connect(("127.0.0.1", port)) as c:
                c.sendall(b"hello %d" % i)
                assert recv_exactly(c, 7) == b"hello %d" % i
        srv.wait_for_line(r"^disconnected: ", count=3)
        srv.signal(signal.SIGINT)                 # Ctrl-C: a clean stop
        assert srv.wait() == 0, srv.output
        out = srv.output
    assert len(re.findall(r"^connected: \('127\.0\.0\.1', \d+\)$", out, re.M)) == 3
    assert "stopped after 3 sessions" in out
    assert "Traceback" not in out


# ---- the chat example: a server and three scripted clients ----

def test_chat_example_three_clients_see_each_other_in_order(backend):
    count = 5
    with Proc.python(EXAMPLES / "chat_server.py", "--host", "127.0.0.1", "--port", "0",
                     backend=backend) as srv:
        port = srv.port(r"chat server on 127\.0\.0\.1:(\d+)")
        nicks = ["ann", "bob", "cy"]
        clients = [Proc.python(EXAMPLES / "chat_client.py", "--port", port, "--nick", nick,
                               "--join", "lobby", "--wait-members", "3",
                               "--say", f"hello from {nick}", "--count", count,
                               "--expect", 3 * count, backend=backend)
                   for nick in nicks]
        try:
            codes = [c.wait(60) for c in clients]
            outputs = [c.output for c in clients]
        finally:
            for c in clients:
                c.kill()
        for nick, code, out in zip(nicks, codes, outputs):
            assert code == 0, f"{nick} exited {code}:\n{out}"
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0, srv.output
    heard = []
    for out in outputs:
        said = re.findall(r"^\[lobby\] <(\w+)> (.*)$", out, re.M)
        assert len(said) == 3 * count, out
        for nick in nicks:
            # Every message of every member, once and in the order it was said.
            assert [t for n, t in said if n == nick] == \
                [f"hello from {nick} {i}" for i in range(1, count + 1)], out
        heard.append(said)
    # The room has one order: every member heard the same sequence.
    assert heard[0] == heard[1] == heard[2]
    assert "Traceback" not in srv.output


# ---- the chat server's rules, in-process ----

def _running_chat(server, **kw):
    mod = load_example("chat_server")
    state = mod.ChatServer(**kw)
    srv = server(state.session_factory)
    view = types.SimpleNamespace(address=srv.address, service=srv.service)
    del srv, state
    yield view
    # pytest keeps fixture values until after the leak check: let go of the service
    # (and through it the core).
    view.service = None


@pytest.fixture
def chat(server):
    """A running chat server (``.address``, ``.service``)."""
    yield from _running_chat(server)


@pytest.fixture
def chat_unlimited(server):
    """The same with no limit on what a client says (a test saying faster than people)."""
    yield from _running_chat(server, say_rate=0)


@pytest.fixture
def chat_burst_only(server):
    """The same with limits that refill too slowly to count in a test (one request in
    1000 s): what a flood gets through is the burst, however late a loaded machine
    serves it (at 5 a second, a server 50 ms late per request let 26 of 300 through)."""
    yield from _running_chat(server, say_rate=0.001, query_rate=0.001, join_rate=0.001)


def chat_connect(srv):
    c = connect(srv.address)
    (welcome,) = read_packets(c, 1)
    assert welcome[0] == proto.S_WELCOME
    return c, proto.Reader(welcome[1]).str8()


def test_chat_server_join_say_nick_who_rooms_leave(chat):
    a, guest_a = chat_connect(chat)
    b, guest_b = chat_connect(chat)
    with a, b:
        assert re.fullmatch(r"guest-\d+", guest_a) and guest_a != guest_b
        a.sendall(proto.nick("ann"))
        assert read_packets(a, 1) == [(proto.S_NICK, proto.pack_str8(guest_a)
                                       + proto.pack_str8("ann"))]
        a.sendall(proto.join("lobby"))
        assert read_packets(a, 2) == [
            ref.parse(proto.joined("lobby", "ann"))[0][0],
            ref.parse(proto.who_list("lobby", ["ann"]))[0][0]]
        b.sendall(proto.join("lobby"))
        assert read_packets(b, 2) == [
            ref.parse(proto.joined("lobby", guest_b))[0][0],
            ref.parse(proto.who_list("lobby", ["ann", guest_b]))[0][0]]
        assert read_packets(a, 1) == ref.parse(proto.joined("lobby", guest_b))[0]
        b.sendall(proto.say("lobby", "hi ann \u2603"))
        said = ref.parse(proto.said("lobby", guest_b, "hi ann \u2603"))[0]
        assert read_packets(a, 1) == said and read_packets(b, 1) == said
        b.sendall(proto.nick("ann"))                      # taken
        (err,) = read_packets(b, 1)
        assert err[0] == proto.S_ERROR and b"taken" in err[1]
        b.sendall(proto.nick("bob"))                      # both hear it, once
        changed = ref.parse(proto.nick_changed(guest_b, "bob"))[0]
        assert read_packets(a, 1) == changed and read_packets(b, 1) == changed
        a.sendall(proto.join("games") + proto.rooms() + proto.who("lobby"))
        read_packets(a, 2)                                # joined games, who games
        (rooms, who) = read_packets(a, 2)
        r = proto.Reader(rooms[1])
        assert rooms[0] == proto.S_ROOMS
        assert [(r.str8(), r.u16()) for _ in range(r.u16())] == [("games", 1), ("lobby", 2)]
        assert who == ref.parse(proto.who_list("lobby", ["ann", "bob"]))[0][0]
        a.sendall(proto.say("nowhere", "hello?"))         # not a member: refused
        (err,) = read_packets(a, 1)
        assert err[0] == proto.S_ERROR and b"not in nowhere" in err[1]
        a.sendall(proto.leave("lobby"))
        left = ref.parse(proto.left("lobby", "ann"))[0]
        assert read_packets(a, 1) == left and read_packets(b, 1) == left
    # Both gone: their nicks and rooms with them.
    wait_for(lambda: chat.service.session_count == 0, message="the sessions to end")


def test_chat_server_drops_a_client_that_breaks_the_protocol(chat, caplog_iocpnet):
    good, _ = chat_connect(chat)
    bad, _ = chat_connect(chat)
    with good, bad:
        bad.sendall(iocpnet.make_packet(proto.C_SAY, b"\x09lob"))   # str8 runs past the end
        assert recv_until_eof(bad) == b""
        bad2, _ = chat_connect(chat)
        with bad2:
            bad2.sendall(iocpnet.make_packet(999))                   # unknown id
            assert recv_until_eof(bad2) == b""
        good.sendall(proto.join("lobby"))
        assert read_packets(good, 2)[1][0] == proto.S_WHO           # still served
    assert any("protocol error in packet 4" in r.getMessage() or
               "malformed packet 4" in r.getMessage() for r in caplog_iocpnet.records)
    assert any("unknown packet id 999" in r.getMessage() for r in caplog_iocpnet.records)


def test_chat_room_order_is_the_same_for_every_member(chat_unlimited):
    """Four members talk at once from four sockets: each member hears the room's
    messages in one and the same order (broadcast under the room's lock), and each
    sender's messages in the order it sent them."""
    members = [chat_connect(chat_unlimited) for _ in range(4)]
    try:
        for i, (c, _) in enumerate(members):
            c.sendall(proto.join("race"))
            read_packets(c, 2)
            for c2, _ in members[:i]:
                read_packets(c2, 1)                 # the newcomer's S_JOINED
        n = 50
        for k in range(n):
            for c, nick in members:
                c.sendall(proto.say("race", f"{nick} {k}"))
        heard = []
        for c, _ in members:
            got = read_packets(c, n * len(members))
            texts = [_said_text(p) for _, p in got]
            heard.append(texts)
        assert all(h == heard[0] for h in heard)
        for _, nick in members:
            assert [t for t in heard[0] if t.split()[0] == nick] == \
                [f"{nick} {k}" for k in range(n)]
    finally:
        for c, _ in members:
            c.close()


def _said_text(payload):
    r = proto.Reader(payload)
    r.str8()
    r.str8()
    return r.text()


# ---- the protocol module ----

def test_chat_protocol_encodings():
    assert proto.pack_str8("ab") == b"\x02ab"
    assert ref.parse(proto.say("lobby", "hi"))[0] == [(proto.C_SAY, b"\x05lobbyhi")]
    r = proto.Reader(ref.parse(proto.said("r", "n\u00e9", "t"))[0][0][1])
    assert (r.str8(), r.str8(), r.text()) == ("r", "n\u00e9", "t")
    r.end()
    with pytest.raises(proto.ProtocolError):
        proto.Reader(b"\x05ab").str8()
    with pytest.raises(proto.ProtocolError):
        proto.Reader(b"\x01").u16()
    with pytest.raises(proto.ProtocolError):
        proto.Reader(b"\xff\xfe").text()
    with pytest.raises(proto.ProtocolError):
        proto.Reader(b"x").end()
    assert proto.valid_name("lobby") and not proto.valid_name("two words")
    assert not proto.valid_name("") and not proto.valid_name("x" * 33)
    # A list too long for one packet is cut, and says how many it holds.
    names = [f"{i:032d}" for i in range(3000)]
    packet = proto.who_list("big", names)
    assert len(packet) <= iocpnet.PACKET_SIZE_MAX
    r = proto.Reader(ref.parse(packet)[0][0][1])
    assert r.str8() == "big"
    n = r.u16()
    assert 1000 < n < 3000 and [r.str8() for _ in range(n)] == names[:n]
    r.end()
    # Every id is distinct, and client and server ids do not overlap.
    ids = [getattr(proto, k) for k in proto.__all__ if k[:2] in ("C_", "S_")]
    assert len(ids) == len(set(ids)) == 14
