"""The chat protocol of ``examples/chat_server.py``, ``examples/chat_client.py`` and
``python -m iocpnet dummy-client --protocol chat``.

It ships inside the package (and not only with the examples) because the load tool
speaks it: one definition, used by the server, the client and the load tool.

Framing is PacketSession's: ``[size: u16][id: u16][payload]``, little-endian, ``size``
counting the 4-byte header.  Inside payloads:

- ``str8``: a u8 byte count then that many bytes of UTF-8 (room names and nicks, 1 to
  32 bytes; see ``MAX_NAME_BYTES``);
- ``text``: UTF-8 running to the end of the payload (at most ``MAX_TEXT_BYTES``);
- ``u16``: little-endian.

Client to server:

=========  ===  ==========================  ================================================
packet     id   payload                     meaning
=========  ===  ==========================  ================================================
C_NICK     1    text nick                   take this nick (answer: S_NICK to you and to
                                            everyone in your rooms, or S_ERROR)
C_JOIN     2    text room                   enter a room (created on first join)
C_LEAVE    3    text room                   leave a room (emptied rooms disappear)
C_SAY      4    str8 room, text message     say something in a room you are in
C_ROOMS    5    (empty)                     ask for the room list (answer: S_ROOMS)
C_WHO      6    text room                   ask who is in a room (answer: S_WHO)
=========  ===  ==========================  ================================================

Server to client:

=========  ===  ==========================================  ================================
packet     id   payload                                     meaning
=========  ===  ==========================================  ================================
S_WELCOME  101  str8 nick                                   sent on connect: your first nick
S_JOINED   102  str8 room, str8 nick                        someone (you too) joined a room
S_LEFT     103  str8 room, str8 nick                        someone (you too) left a room
S_SAID     104  str8 room, str8 nick, text message          a message in a room (your own
                                                            comes back too, in room order)
S_NICK     105  str8 old, str8 new                          someone (you too) changed nick
S_ROOMS    106  u16 n, then n x (str8 room, u16 members)    the room list
S_WHO      107  str8 room, u16 n, then n x str8 nick        who is in a room (also sent to
                                                            you right after you join it)
S_ERROR    108  text reason                                 a request was refused
=========  ===  ==========================================  ================================

Ordering: every member of a room receives that room's S_JOINED / S_LEFT / S_SAID
packets in one and the same order (the server broadcasts under the room's lock), and a
client's own messages come back in the order it said them.  Broadcast packets are built
once with ``make_packet`` and queued to every member by reference.

Unknown packet ids and malformed payloads disconnect the sender with a reason.
"""
from __future__ import annotations

import struct
from typing import List, Tuple

from iocpnet import PACKET_HEADER_SIZE, PACKET_SIZE_MAX, make_packet

__all__ = [
    "C_NICK", "C_JOIN", "C_LEAVE", "C_SAY", "C_ROOMS", "C_WHO",
    "S_WELCOME", "S_JOINED", "S_LEFT", "S_SAID", "S_NICK", "S_ROOMS", "S_WHO", "S_ERROR",
    "MAX_NAME_BYTES", "MAX_TEXT_BYTES", "ProtocolError", "Reader",
    "pack_str8", "valid_name",
    "nick", "join", "leave", "say", "rooms", "who",
    "welcome", "joined", "left", "said", "nick_changed", "room_list", "who_list", "error",
]

C_NICK = 1
C_JOIN = 2
C_LEAVE = 3
C_SAY = 4
C_ROOMS = 5
C_WHO = 6

S_WELCOME = 101
S_JOINED = 102
S_LEFT = 103
S_SAID = 104
S_NICK = 105
S_ROOMS = 106
S_WHO = 107
S_ERROR = 108

MAX_NAME_BYTES = 32
# Small enough that S_SAID (two names and the text) always fits in one packet.
MAX_TEXT_BYTES = 8192

_U16 = struct.Struct("<H")
# Payload bytes a list packet may use: the largest packet less its header.
_ROOM_FOR_LISTS = PACKET_SIZE_MAX - PACKET_HEADER_SIZE


class ProtocolError(ValueError):
    """A payload that does not follow the protocol."""


def valid_name(name: str) -> bool:
    """A room name or nick: 1 to MAX_NAME_BYTES bytes of UTF-8, printable, no spaces."""
    return (0 < len(name.encode("utf-8")) <= MAX_NAME_BYTES and name.isprintable()
            and not any(c.isspace() for c in name))


def pack_str8(s: str) -> bytes:
    b = s.encode("utf-8")
    if len(b) > 255:
        raise ValueError(f"string of {len(b)} bytes is too long for a str8")
    return bytes((len(b),)) + b


class Reader:
    """Reads a payload field by field; any shortfall raises ProtocolError."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def str8(self) -> str:
        if self.pos >= len(self.data):
            raise ProtocolError("payload ends before a string")
        n = self.data[self.pos]
        end = self.pos + 1 + n
        if end > len(self.data):
            raise ProtocolError("string runs past the end of the payload")
        raw = self.data[self.pos + 1:end]
        self.pos = end
        return _decode(raw)

    def u16(self) -> int:
        if self.pos + 2 > len(self.data):
            raise ProtocolError("payload ends before a u16")
        (v,) = _U16.unpack_from(self.data, self.pos)
        self.pos += 2
        return int(v)

    def text(self) -> str:
        raw = self.data[self.pos:]
        self.pos = len(self.data)
        return _decode(raw)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError(f"{len(self.data) - self.pos} unexpected bytes at the end")


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(f"invalid UTF-8: {e}") from None


# ---- client to server: whole packets, ready to Send ----

def nick(name: str) -> bytes:
    return make_packet(C_NICK, name.encode("utf-8"))


def join(room: str) -> bytes:
    return make_packet(C_JOIN, room.encode("utf-8"))


def leave(room: str) -> bytes:
    return make_packet(C_LEAVE, room.encode("utf-8"))


def say(room: str, message: str) -> bytes:
    return make_packet(C_SAY, pack_str8(room) + message.encode("utf-8"))


def rooms() -> bytes:
    return make_packet(C_ROOMS)


def who(room: str) -> bytes:
    return make_packet(C_WHO, room.encode("utf-8"))


# ---- server to client ----

def welcome(name: str) -> bytes:
    return make_packet(S_WELCOME, pack_str8(name))


def joined(room: str, name: str) -> bytes:
    return make_packet(S_JOINED, pack_str8(room) + pack_str8(name))


def left(room: str, name: str) -> bytes:
    return make_packet(S_LEFT, pack_str8(room) + pack_str8(name))


def said(room: str, name: str, message: str) -> bytes:
    return make_packet(S_SAID, pack_str8(room) + pack_str8(name) + message.encode("utf-8"))


def nick_changed(old: str, new: str) -> bytes:
    return make_packet(S_NICK, pack_str8(old) + pack_str8(new))


def room_list(entries: List[Tuple[str, int]]) -> bytes:
    """S_ROOMS; a list too long for one packet is cut (n says how many are listed)."""
    parts: List[bytes] = []
    size = 2
    for room, members in entries:
        part = pack_str8(room) + _U16.pack(min(members, 0xFFFF))
        if size + len(part) > _ROOM_FOR_LISTS:
            break
        parts.append(part)
        size += len(part)
    return make_packet(S_ROOMS, _U16.pack(len(parts)) + b"".join(parts))


def who_list(room: str, names: List[str]) -> bytes:
    """S_WHO; a list too long for one packet is cut (n says how many are listed).  A
    name that is not a nick (``valid_name``) is left out: with Redis the names are
    every server's, whatever wrote them there (the chat server tells the asker how many
    it left out)."""
    head = pack_str8(room)
    parts: List[bytes] = []
    size = len(head) + 2
    for n in names:
        if not valid_name(n):
            continue
        part = pack_str8(n)
        if size + len(part) > _ROOM_FOR_LISTS:
            break
        parts.append(part)
        size += len(part)
    return make_packet(S_WHO, head + _U16.pack(len(parts)) + b"".join(parts))


def error(reason: str) -> bytes:
    return make_packet(S_ERROR, reason.encode("utf-8"))
