"""RESP2, the Redis serialisation protocol, as a sans-I/O codec: commands out, replies in.

What it owns.  ``encode_command`` turns one command (its arguments: bytes, str, int or
float) into the bytes Redis reads.  ``Parser`` is fed the bytes a connection receives
and yields the replies whole, in order: simple strings (``str``), errors (``RespError``
values, not raised: a command's error is an answer), integers, bulk strings (``bytes``,
None for the null bulk) and arrays (``list``, None for the null array).  It does no I/O
and keeps no thread-shared state: one parser belongs to one connection, fed by that
connection's strand (backplane.py), so it has no lock.

Why it is in Python and not C.  The design says parsers of untrusted bytes are C or
Cython; what this parses comes from the Redis server the application configured, not
from a player, and the volume is one reply per command plus one push per shared message.
It is still written for a peer that lies: every length is bounded before anything is
buffered for it (``max_bulk``, ``max_elements``, ``max_line``, ``max_depth``), a length
that is not a plain decimal is refused, a bulk string must end with CRLF where its
length says, and anything else is a ``ProtocolError`` that the connection turns into a
disconnect with that reason.  tests/test_resp.py feeds it random cuts and random bytes.

Cost.  A reply cut across receives resumes where it stopped: the arrays not yet whole
are kept (``_stack``, each with the elements parsed so far) and their bytes dropped from
the buffer, so only the element that was cut is parsed again.  A reply of a million
small elements arriving a few at a time costs its size, not its size squared (parsing
it again from its start per receive made a slow or hostile Redis spin the subscriber's
strand).  A bulk string waits, without re-parsing, until ``need`` says its bytes are
all there (the pieces kept in a list, joined once), so a large value costs one pass and
one copy.  ``Parser.messages`` is the fast
path of the backplane's subscriber connection: a ``message`` push is recognised by its
fixed prefix and its two bulk strings sliced straight out of the buffer.
"""
from __future__ import annotations

import re
from typing import Any, List, Optional, Tuple, Union

__all__ = ["RespError", "ProtocolError", "Parser", "encode_command", "Reply"]


class RespError(Exception):
    """An error reply (``-ERR ...``, ``-WRONGPASS ...``): the value of a reply, handed to
    the command's callback; its first word (``kind``) says which error."""

    @property
    def kind(self) -> str:
        text = str(self)
        return text.split(" ", 1)[0] if text else ""


class ProtocolError(Exception):
    """The server sent bytes that are not RESP2 (or over a limit): the connection is
    beyond repair and is closed with this reason."""


Reply = Union[None, int, str, bytes, RespError, List[Any]]

_CRLF = b"\r\n"
_DECIMAL = re.compile(rb"-?[0-9]{1,19}\Z")


def _arg(a: object) -> bytes:
    if isinstance(a, bytes):
        return a
    if isinstance(a, str):
        return a.encode("utf-8")
    if isinstance(a, (bytearray, memoryview)):
        return bytes(a)
    if isinstance(a, bool):
        raise TypeError("a bool is not a Redis argument (say 1 or 0)")
    if isinstance(a, (int, float)):
        return repr(a).encode("ascii")
    raise TypeError(f"a Redis argument must be bytes, str, int or float, not "
                    f"{type(a).__name__}")


def encode_command(*args: object) -> bytes:
    """One command as RESP2 (an array of bulk strings)."""
    if not args:
        raise ValueError("a command needs at least its name")
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = _arg(a)
        parts.append(b"$%d\r\n" % len(b))
        parts.append(b)
        parts.append(_CRLF)
    return b"".join(parts)


class _Incomplete(Exception):
    """Not enough bytes yet; ``need``: the buffer length at which to try again; ``at``
    (set by ``Parser._next``): where the element that was cut starts."""

    def __init__(self, need: int) -> None:
        self.need = need
        self.at = -1


# A pub/sub push: *3 $7 message $<channel> $<payload>.
_MESSAGE = b"*3\r\n$7\r\nmessage\r\n$"


class Parser:
    """Feed bytes with ``feed``; take whole replies with ``replies()`` (or, on a
    subscriber connection, ``messages()``)."""

    def __init__(self, *, max_reply: int = 64 << 20, max_bulk: int = 64 << 20,
                 max_elements: int = 1 << 20, max_line: int = 64 << 10,
                 max_depth: int = 8) -> None:
        self.max_reply = max_reply
        self.max_bulk = max_bulk
        self.max_elements = max_elements
        self.max_line = max_line
        self.max_depth = max_depth
        self._buf = b""
        self._pos = 0
        self._need = 0          # do not parse again before the buffer has this many bytes
        # Pieces received while the buffer is short of `_need` (a large bulk string on
        # its way): kept apart and joined once, when they reach it.  Appending each to
        # `_buf` copied everything so far per receive (the square of the size).
        self._more: List[bytes] = []
        self._more_len = 0
        # The arrays of the reply being received that are not whole yet, outermost
        # first: [elements so far, elements announced].  Their bytes have left `_buf`;
        # `_partial` counts them (for `max_reply` and `buffered`).
        self._stack: List[Tuple[List[Any], int]] = []
        self._partial = 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet parsed into a reply."""
        return len(self._buf) - self._pos + self._more_len + self._partial

    def feed(self, data: Union[bytes, bytearray, memoryview]) -> None:
        chunk = bytes(data)
        if not chunk:
            return
        if len(self._buf) + self._more_len + len(chunk) < self._need:
            self._more.append(chunk)
            self._more_len += len(chunk)
            return
        if self._more:
            self._more.append(chunk)
            chunk = b"".join(self._more)
            self._more = []
            self._more_len = 0
        if self._pos:
            self._buf = self._buf[self._pos:] + chunk
            self._need -= self._pos
            self._pos = 0
        elif self._buf:
            self._buf += chunk
        else:
            self._buf = chunk

    def replies(self) -> List[Reply]:
        """Every whole reply received so far, in order (the rest waits for more bytes)."""
        out: List[Reply] = []
        buf = self._buf
        n = len(buf)
        if n < self._need:
            return out
        pos = self._pos
        while pos < n:
            try:
                value, pos = self._next(buf, pos)
            except _Incomplete as e:
                self._need = e.need
                pos = e.at
                break
            out.append(value)
        self._done(pos)
        return out

    def messages(self) -> List[Tuple[Optional[bytes], Any]]:
        """On a subscriber connection: every whole push so far, ``message`` pushes as
        ``(channel, payload)`` and any other reply (a subscribe confirmation, a pong, an
        error) as ``(None, reply)`` in its place in the order."""
        out: List[Tuple[Optional[bytes], Any]] = []
        buf = self._buf
        n = len(buf)
        if n < self._need:
            return out
        pos = self._pos
        mlen = len(_MESSAGE)
        while pos < n:
            if not self._stack and buf.startswith(_MESSAGE, pos):
                # The fast path: two bulk strings at known places.
                try:
                    channel, p = self._bulk_at(buf, pos + mlen - 1)
                    if p >= n or buf[p] != 36:          # '$'
                        if p >= n:
                            raise _Incomplete(p + 1)
                        raise ProtocolError("a message push without its payload")
                    payload, p = self._bulk_at(buf, p)
                except _Incomplete as e:
                    self._need = e.need
                    break
                if channel is None or payload is None:
                    raise ProtocolError("a message push with a null channel or payload")
                out.append((channel, payload))
                pos = p
                continue
            try:
                value, pos = self._next(buf, pos)
            except _Incomplete as e:
                self._need = e.need
                pos = e.at
                break
            if isinstance(value, list) and len(value) == 3 and value[0] == b"message":
                if not (isinstance(value[1], bytes) and isinstance(value[2], bytes)):
                    raise ProtocolError("a message push whose channel or payload is "
                                        "not a bulk string")
                out.append((value[1], value[2]))      # a message the fast path missed
            else:
                out.append((None, value))
        self._done(pos)
        return out

    def _done(self, pos: int) -> None:
        if pos >= len(self._buf):
            self._buf, self._pos, self._need = b"", 0, 0
        else:
            self._pos = pos
        if len(self._buf) - self._pos + self._partial > self.max_reply:
            # What is left is one reply, unfinished, and already over the bound.
            raise ProtocolError(f"a reply over {self.max_reply} bytes")

    # ---- the grammar ----

    def _line(self, buf: bytes, pos: int) -> Tuple[bytes, int]:
        """The bytes after the type byte at `pos`, up to CRLF; and the position after."""
        end = buf.find(_CRLF, pos + 1, pos + 1 + self.max_line + 2)
        if end < 0:
            if len(buf) - pos > self.max_line + 2:
                raise ProtocolError(f"a line over {self.max_line} bytes")
            raise _Incomplete(len(buf) + 1)
        return buf[pos + 1:end], end + 2

    def _length(self, line: bytes, what: str) -> int:
        if not _DECIMAL.match(line):
            raise ProtocolError(f"bad {what} length {line[:32]!r}")
        return int(line)

    def _bulk_at(self, buf: bytes, pos: int) -> Tuple[Any, int]:
        """A bulk string whose '$' is at `pos`."""
        line, p = self._line(buf, pos)
        n = self._length(line, "bulk")
        if n == -1:
            return None, p
        if n < 0 or n > self.max_bulk:
            raise ProtocolError(f"a bulk string of {n} bytes (limit {self.max_bulk})")
        stop = p + n
        if stop + 2 > len(buf):
            raise _Incomplete(stop + 2)
        if buf[stop:stop + 2] != _CRLF:
            raise ProtocolError("a bulk string not ended by CRLF where its length says")
        return buf[p:stop], stop + 2

    def _next(self, buf: bytes, pos: int) -> Tuple[Reply, int]:
        """The next whole reply from `pos`, resuming the arrays left in `_stack`, and
        the position after it.  When the bytes end inside it: the arrays so far stay
        in `_stack`, their bytes counted in `_partial`, and the `_Incomplete` raised
        says (``at``) where the element that was cut starts."""
        stack = self._stack
        start = pos
        try:
            while True:
                if pos >= len(buf):
                    raise _Incomplete(pos + 1)
                t = buf[pos]
                if t == 42:                           # '*' array
                    line, p = self._line(buf, pos)
                    n = self._length(line, "array")
                    if n == -1:
                        value: Reply = None
                    else:
                        if n < 0 or n > self.max_elements:
                            raise ProtocolError(f"an array of {n} elements "
                                                f"(limit {self.max_elements})")
                        if len(stack) >= self.max_depth:
                            raise ProtocolError(f"arrays nested deeper than "
                                                f"{self.max_depth}")
                        if n:
                            stack.append(([], n))
                            pos = p
                            continue
                        value = []
                else:
                    value, p = self._scalar(buf, pos, t)
                pos = p
                # The value ends the arrays it fills; the innermost one still short
                # of its count takes the next element.
                while stack:
                    items, n = stack[-1]
                    items.append(value)
                    if len(items) < n:
                        break
                    stack.pop()
                    value = items
                else:
                    self._partial = 0
                    return value, pos
        except _Incomplete as e:
            self._partial += pos - start
            e.at = pos
            raise

    def _scalar(self, buf: bytes, pos: int, t: int) -> Tuple[Reply, int]:
        if t == 36:                                   # '$' bulk string
            return self._bulk_at(buf, pos)
        if t == 58:                                   # ':' integer
            line, p = self._line(buf, pos)
            return self._length(line, "integer"), p
        if t == 43:                                   # '+' simple string
            line, p = self._line(buf, pos)
            return line.decode("utf-8", "replace"), p
        if t == 45:                                   # '-' error
            line, p = self._line(buf, pos)
            return RespError(line.decode("utf-8", "replace")), p
        raise ProtocolError(f"unknown RESP2 type byte {bytes([t])!r}")


def parse_all(data: bytes) -> Tuple[List[Reply], int]:
    """Parse `data` whole (tests, tools): the replies, and how many bytes are left over."""
    p = Parser()
    p.feed(data)
    out = p.replies()
    return out, p.buffered

