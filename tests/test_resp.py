"""The RESP2 codec of the Redis backplane (iocpnet.resp), on its own: every reply type,
any cut of the bytes, hostile input (lengths that lie, limits, garbage), and the
subscriber's fast path agreeing with the general parser.  No sockets: it is sans-I/O."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iocpnet.resp import Parser, ProtocolError, RespError, encode_command, parse_all


def enc(value):
    """A reference encoder of replies (what a Redis server sends)."""
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, RespError):
        return b"-" + str(value).encode() + b"\r\n"
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, str):
        return b"+" + value.encode() + b"\r\n"
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    return b"*%d\r\n" % len(value) + b"".join(enc(v) for v in value)


def norm(value):
    if isinstance(value, RespError):
        return ("err", str(value))
    if isinstance(value, list):
        return [norm(v) for v in value]
    return value


simple = st.text(st.characters(blacklist_characters="\r\n", max_codepoint=0x2FF),
                 max_size=20)
leaf = st.one_of(st.none(), st.integers(-2**63, 2**63 - 1), simple,
                 st.binary(max_size=40), simple.map(RespError))
replies = st.recursive(leaf, lambda kids: st.lists(kids, max_size=5), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.lists(replies, min_size=1, max_size=6), st.data())
def test_any_cut_gives_the_same_replies(values, data):
    wire = b"".join(enc(v) for v in values)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    p = Parser()
    got = []
    last = 0
    for c in cuts + [len(wire)]:
        p.feed(wire[last:c])
        got += p.replies()
        last = c
    assert [norm(v) for v in got] == [norm(v) for v in values]
    assert p.buffered == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.binary(min_size=1, max_size=30), st.binary(max_size=300)),
    st.sampled_from([["subscribe", 1], ["pong", b""], ["unsubscribe", 0]])),
    min_size=1, max_size=8), st.data())
def test_the_subscriber_fast_path_agrees(items, data):
    def wire_of(item):
        if isinstance(item, tuple):
            return enc([b"message", item[0], item[1]])
        return enc([item[0].encode() if isinstance(item[0], str) else item[0]] + item[1:])
    wire = b"".join(wire_of(i) for i in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=5)))
    p = Parser()
    got = []
    last = 0
    for c in cuts + [len(wire)]:
        p.feed(wire[last:c])
        got += p.messages()
        last = c
    assert len(got) == len(items)
    for (channel, value), item in zip(got, items):
        if isinstance(item, tuple):
            assert (channel, value) == item
        else:
            assert channel is None and value[0] == item[0].encode()


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_is_a_protocol_error_or_waits(junk):
    """Whatever the bytes: replies, a wait for more, or ProtocolError; nothing else."""
    for method in ("replies", "messages"):
        p = Parser(max_bulk=1000, max_elements=50, max_line=100, max_reply=4000)
        try:
            p.feed(junk)
            getattr(p, method)()
        except ProtocolError:
            pass


@pytest.mark.parametrize("wire, reason", [
    (b"$5\r\nhello!!\r\n", "not ended by CRLF"),
    (b"$1001\r\n", "bulk string of 1001"),
    (b"*51\r\n", "array of 51"),
    (b"$-5\r\n", "bulk string of -5"),
    (b":12x\r\n", "bad integer"),
    (b"$ 5\r\n", "bad bulk"),
    (b"$5_0\r\n", "bad bulk"),
    (b"%2\r\n", "unknown RESP2 type"),
    (b"+" + b"x" * 200, "line over 100"),
    (b"*1\r\n" * 9 + b":1\r\n", "nested deeper"),
])
def test_lies_and_limits_are_refused(wire, reason):
    p = Parser(max_bulk=1000, max_elements=50, max_line=100, max_depth=8)
    with pytest.raises(ProtocolError, match=reason):
        p.feed(wire)
        p.replies()


@pytest.mark.parametrize("wire", [
    b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$-1\r\n",
    b"*3\r\n$7\r\nmessage\r\n$-1\r\n$1\r\nx\r\n",
    b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n*1\r\n:1\r\n",
    b"*3\r\n$7\r\nmessage\r\n:5\r\n$1\r\nx\r\n",
])
def test_a_message_push_without_two_bulk_strings_is_refused(wire):
    """A `message` push whose channel or payload is not a bulk string (null, an array,
    an integer) reached the backplane as None or a list: a TypeError in OnRecv, a
    traceback per reconnect.  It is a ProtocolError like any other lie."""
    p = Parser()
    p.feed(wire)
    with pytest.raises(ProtocolError, match="message push"):
        p.messages()


def test_an_unfinished_reply_over_the_bound_is_refused():
    """A reply that keeps growing (a huge array of small strings) stops at max_reply,
    not at the machine's memory."""
    p = Parser(max_reply=10_000, max_elements=1 << 20)
    p.feed(b"*1000000\r\n")
    with pytest.raises(ProtocolError, match="over 10000"):
        for _ in range(2000):
            p.feed(b"$3\r\nabc\r\n")
            p.replies()


def count_calls(parser, method):
    """Count the calls of one of the parser's steps (work counted, not timed): the
    returned list's one item grows with each call."""
    calls = [0]
    original = getattr(parser, method)

    def counting(*a):
        calls[0] += 1
        return original(*a)
    setattr(parser, method, counting)
    return calls


def test_a_long_reply_arriving_in_pieces_is_parsed_once():
    """A reply of many small elements arriving a few bytes at a time (a slow or hostile
    Redis) costs its size, not its size squared: the arrays not yet whole are kept, and
    only the element that was cut is parsed again.  Parsing from the reply's start per
    receive made 1000 elements (4001 lines) 6.9 million line parses, and a million
    elements would spin a subscriber's strand for days; counted, not timed."""
    n = 1000
    value = [[b"abc", i, "ok"] for i in range(n)]
    wire = enc(value)
    p = Parser()
    lines = count_calls(p, "_line")
    got = []
    for i in range(0, len(wire), 7):
        p.feed(wire[i:i + 7])
        got += p.replies()
        assert not got or i + 7 >= len(wire)
    assert got == [value] and p.buffered == 0
    # Each element's line is parsed once, again when a cut fell inside the element.
    assert 4 * n + 1 <= lines[0] <= 2 * (4 * n + 1), lines


def test_a_nested_reply_fed_byte_by_byte_and_its_bounds():
    """Byte by byte through nested arrays (each cut resumes inside the innermost
    array); the bytes of the arrays kept aside still count toward max_reply."""
    value = [[b"a", [1, [], None, [RespError("ERR x"), "s"]]], b"", [[[b"deep"]]]]
    wire = enc(value) + b":7\r\n"
    p = Parser()
    got = []
    for i in range(len(wire)):
        p.feed(wire[i:i + 1])
        got += p.replies()
        done = sum(len(enc(v)) for v in got)
        assert p.buffered == i + 1 - done
    assert [norm(v) for v in got] == [norm(value), 7] and p.buffered == 0
    p = Parser(max_reply=100)
    p.feed(b"*1000\r\n")
    with pytest.raises(ProtocolError, match="over 100"):
        for _ in range(100):      # every piece ends where an element does
            p.feed(b":1\r\n")
            p.replies()
    p = Parser(max_depth=3)
    p.feed(b"*1\r\n*1\r\n*1\r\n")
    assert p.replies() == []
    p.feed(b":1\r\n")
    assert p.replies() == [[[[1]]]]
    p.feed(b"*1\r\n*1\r\n")
    p.replies()
    p.feed(b"*1\r\n*1\r\n")
    with pytest.raises(ProtocolError, match="deeper than 3"):
        p.replies()


def test_a_large_bulk_is_not_parsed_again_per_receive():
    """A 1 MiB value arriving in 16 KiB pieces: each piece before the last costs a
    length check, not a parse (the parser waits for `need` bytes)."""
    value = bytes(range(256)) * 4096
    wire = enc(value)
    p = Parser()
    calls = count_calls(p, "_next")
    got = []
    for i in range(0, len(wire), 16384):
        p.feed(wire[i:i + 16384])
        got += p.replies()
    assert got == [value] and calls[0] == 2


def test_a_large_bulk_costs_its_size_not_its_size_squared():
    """A value arriving in 64 KiB pieces was appended to one growing bytes object, a
    copy of everything so far per receive: 20 MiB took ~3 s of the subscriber's strand
    (64 MiB, the default bound, ~30 s) on every server of the group.  The pieces wait
    apart, each copied once when the value is whole: the buffer being parsed never
    grows piece by piece."""
    size = 8 << 20
    wire = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n" + enc(b"v" * size)
    p = Parser()
    got = []
    largest = 0
    for i in range(0, len(wire), 65536):
        p.feed(wire[i:i + 65536])
        got += p.messages()
        if not got:
            largest = max(largest, len(p._buf))
            assert p.buffered == min(i + 65536, len(wire))
    assert len(got) == 1 and got[0] == (b"ch", b"v" * size) and p.buffered == 0
    assert largest <= 65536, largest


def test_encode_command():
    assert encode_command("SET", "k\u00e9", b"\x00v", 7, 1.5) == (
        b"*5\r\n$3\r\nSET\r\n$3\r\nk\xc3\xa9\r\n$2\r\n\x00v\r\n$1\r\n7\r\n$3\r\n1.5\r\n")
    with pytest.raises(TypeError):
        encode_command("SET", "k", True)
    with pytest.raises(TypeError):
        encode_command("SET", "k", None)
    with pytest.raises(ValueError):
        encode_command()
    assert parse_all(b"+OK\r\n:1\r\n$2\r\nab") == (["OK", 1], 6)
    assert RespError("WRONGPASS invalid").kind == "WRONGPASS"
