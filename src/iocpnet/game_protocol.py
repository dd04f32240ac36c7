"""The packets of the game example (examples/game_server.py) and of its load client
(``python -m iocpnet dummy-client --protocol game``).

PacketSession framing (``[size: u16][id: u16][payload]``), little-endian payloads:

Client to server:

- ``C_LOGIN``  ``str8 name, str8 room``: log in (the server awaits a lookup of the
  player), then join the room.
- ``C_MOVE``   ``u32 seq, i16 dx, i16 dy``: move; applied at the room's next tick and
  echoed in that tick's ``S_MOVES``, in the order the player sent them.
- ``C_CHAT``   ``u32 seq, text``: say something to the room; every member, the sender
  included, hears it once, all in one order.

Server to client:

- ``S_WELCOME`` ``u32 player_id, u32 level, u16 tick_hz, str8 room``
- ``S_ROSTER``  ``u16 n, n x u32 player_id``: who was in the room when you joined.
- ``S_JOINED``  ``u32 player_id, str8 name`` / ``S_LEFT`` ``u32 player_id``
- ``S_MOVES``   ``u32 tick, u16 n, n x (u32 player_id, u32 seq, i32 x, i32 y)``: the
  moves applied at that tick, in order (never dropped); a tick with more than
  ``MOVES_PER_PACKET`` (4095) sends several, in order, each with the tick's number.
- ``S_STATE``   ``u32 tick, u16 n, n x (u32 player_id, i32 x, i32 y)``: positions, each
  tick; droppable (a slow reader misses some rather than fall behind).
- ``S_CHAT``    ``u32 player_id, u32 seq, text``
- ``S_ERROR``   ``text``: the server refuses a request (then disconnects): a bad
  packet, a second login, a full room (``room full``).
"""
from __future__ import annotations

import struct
from typing import List, Tuple

C_LOGIN, C_MOVE, C_CHAT = 1, 2, 3
S_WELCOME, S_ROSTER, S_JOINED, S_LEFT, S_MOVES, S_STATE, S_CHAT, S_ERROR = (
    101, 102, 103, 104, 105, 106, 107, 108)

MAX_NAME = 32
MAX_CHAT = 512

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_MOVE = struct.Struct("<Ihh")
_WELCOME = struct.Struct("<IIH")
_TICK = struct.Struct("<IH")
_MOVED = struct.Struct("<IIii")
_POS = struct.Struct("<Iii")
_CHAT = struct.Struct("<II")

# What one S_MOVES holds: a packet is at most 65535 bytes, its 4-byte header included.
MOVES_PER_PACKET = (0xFFFF - 4 - _TICK.size) // _MOVED.size


class ProtocolError(ValueError):
    """A packet that does not parse."""


def _str8(s: str) -> bytes:
    b = s.encode("utf-8")
    if len(b) > 255:
        raise ValueError("string too long")
    return bytes((len(b),)) + b


def _read_str8(p: bytes, off: int) -> Tuple[str, int]:
    if off >= len(p) or off + 1 + p[off] > len(p):
        raise ProtocolError("truncated string")
    n = p[off]
    try:
        return p[off + 1:off + 1 + n].decode("utf-8"), off + 1 + n
    except UnicodeDecodeError:
        raise ProtocolError("string is not UTF-8") from None


# ---- client to server ----

def login(name: str, room: str) -> bytes:
    return _str8(name) + _str8(room)


def parse_login(p: bytes) -> Tuple[str, str]:
    name, off = _read_str8(p, 0)
    room, off = _read_str8(p, off)
    if off != len(p) or not 0 < len(name) <= MAX_NAME or not 0 < len(room) <= MAX_NAME:
        raise ProtocolError("bad login")
    return name, room


def move(seq: int, dx: int, dy: int) -> bytes:
    return _MOVE.pack(seq, dx, dy)


def parse_move(p: bytes) -> Tuple[int, int, int]:
    if len(p) != _MOVE.size:
        raise ProtocolError("bad move")
    seq, dx, dy = _MOVE.unpack(p)
    return seq, dx, dy


def chat(seq: int, text: str) -> bytes:
    return _U32.pack(seq) + text.encode("utf-8")


def parse_chat(p: bytes) -> Tuple[int, str]:
    if not _U32.size <= len(p) <= _U32.size + MAX_CHAT:
        raise ProtocolError("bad chat")
    try:
        return _U32.unpack_from(p)[0], p[_U32.size:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("chat is not UTF-8") from None


# ---- server to client ----

def welcome(player_id: int, level: int, tick_hz: int, room: str) -> bytes:
    return _WELCOME.pack(player_id, level, tick_hz) + _str8(room)


def parse_welcome(p: bytes) -> Tuple[int, int, int, str]:
    if len(p) < _WELCOME.size:
        raise ProtocolError("bad welcome")
    pid, level, hz = _WELCOME.unpack_from(p)
    room, _ = _read_str8(p, _WELCOME.size)
    return pid, level, hz, room


def roster(ids: List[int]) -> bytes:
    return _U16.pack(len(ids)) + b"".join(_U32.pack(i) for i in ids)


def parse_roster(p: bytes) -> List[int]:
    (n,) = _U16.unpack_from(p)
    if len(p) != 2 + 4 * n:
        raise ProtocolError("bad roster")
    return [_U32.unpack_from(p, 2 + 4 * i)[0] for i in range(n)]


def joined(player_id: int, name: str) -> bytes:
    return _U32.pack(player_id) + _str8(name)


def parse_joined(p: bytes) -> Tuple[int, str]:
    (pid,) = _U32.unpack_from(p)
    name, _ = _read_str8(p, 4)
    return pid, name


def left(player_id: int) -> bytes:
    return _U32.pack(player_id)


def moves(tick: int, applied: List[Tuple[int, int, int, int]]) -> bytes:
    return _TICK.pack(tick, len(applied)) + b"".join(_MOVED.pack(*m) for m in applied)


def parse_moves(p: bytes) -> Tuple[int, List[Tuple[int, int, int, int]]]:
    tick, n = _TICK.unpack_from(p)
    if len(p) != _TICK.size + n * _MOVED.size:
        raise ProtocolError("bad moves")
    return tick, [_MOVED.unpack_from(p, _TICK.size + i * _MOVED.size) for i in range(n)]


def state(tick: int, positions: List[Tuple[int, int, int]]) -> bytes:
    return _TICK.pack(tick, len(positions)) + b"".join(_POS.pack(*x) for x in positions)


def parse_state(p: bytes) -> Tuple[int, List[Tuple[int, int, int]]]:
    tick, n = _TICK.unpack_from(p)
    if len(p) != _TICK.size + n * _POS.size:
        raise ProtocolError("bad state")
    return tick, [_POS.unpack_from(p, _TICK.size + i * _POS.size) for i in range(n)]


def chat_heard(player_id: int, seq: int, text: str) -> bytes:
    return _CHAT.pack(player_id, seq) + text.encode("utf-8")


def parse_chat_heard(p: bytes) -> Tuple[int, int, str]:
    pid, seq = _CHAT.unpack_from(p)
    return pid, seq, p[_CHAT.size:].decode("utf-8", "replace")


def error(text: str) -> bytes:
    return text.encode("utf-8")
