"""A pure-Python reference for PacketSession's framing, written from the wire format
alone (README / DESIGN: ``[size: u16 LE][id: u16 LE][payload]``, size counts the 4-byte
header, a size below 4 or above ``max_packet_size`` is an error).  The fuzz and hostile
tests hold the C framing (port/packet.h, through sessions and ``scan_packets``) to it.

Deliberately naive: a byte at a time, no struct, no shared code with the library.
"""

HEADER = 4


class BadPacket:
    """Where a stream stops being valid, and why."""

    __slots__ = ("kind", "size", "packet_id", "offset")

    def __init__(self, kind, size, packet_id, offset):
        self.kind = kind            # "too small" or "too large"
        self.size = size
        self.packet_id = packet_id
        self.offset = offset        # where the bad header starts in the stream

    def matches(self, reason):
        """Does a session's disconnect reason (or scan_packets' error) describe this?"""
        if reason is None or not reason.startswith("bad packet:"):
            return False
        phrase = "smaller than" if self.kind == "too small" else "exceeds max_packet_size"
        return (f"size {self.size} " in reason and phrase in reason
                and f"packet id {self.packet_id})" in reason)

    def __repr__(self):
        return (f"BadPacket({self.kind}, size={self.size}, id={self.packet_id}, "
                f"at={self.offset})")


def parse(stream, max_size=0xFFFF):
    """Parse a whole byte stream: returns (packets, consumed, bad) where packets are
    (id, payload) pairs, consumed is how many bytes they cover (what follows is an
    unfinished packet, unless bad), and bad is a BadPacket or None."""
    data = bytes(stream)
    packets = []
    pos = 0
    while True:
        if len(data) - pos < HEADER:
            return packets, pos, None
        size = data[pos] + 256 * data[pos + 1]
        pid = data[pos + 2] + 256 * data[pos + 3]
        if size < HEADER:
            return packets, pos, BadPacket("too small", size, pid, pos)
        if size > max_size:
            return packets, pos, BadPacket("too large", size, pid, pos)
        if len(data) - pos < size:
            return packets, pos, None
        packets.append((pid, data[pos + HEADER:pos + size]))
        pos += size


def encode(packet_id, payload):
    """One packet on the wire (independent of iocpnet.make_packet)."""
    size = HEADER + len(payload)
    assert size <= 0xFFFF and 0 <= packet_id <= 0xFFFF
    return bytes([size & 0xFF, size >> 8, packet_id & 0xFF, packet_id >> 8]) + bytes(payload)
