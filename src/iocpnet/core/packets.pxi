# core/packets.pxi: PacketSession framing: [size: u16 LE][id: u16 LE][payload].
# Included by _core.pyx (one extension module, one file per concern).


cdef str _bad_packet_reason(packet_status st, size_t size, unsigned pid, size_t limit):
    if st == PACKET_TOO_SMALL:
        return (f"bad packet: size {size} is smaller than the {PKT_HEADER}-byte header "
                f"(packet id {pid})")
    return f"bad packet: size {size} exceeds max_packet_size {limit} (packet id {pid})"


def scan_packets(data, int max_packet_size=PKT_MAX):
    """Run PacketSession's framing over ``data`` (bytes-like) without a connection.

    Returns ``(packets, consumed, error)``: the whole packets found as
    ``(packet_id, payload)`` tuples, how many bytes they used (the rest is an
    unfinished packet), and None or the reason a session would be disconnected for.
    Used by tests and tools; the session's own loop uses the same C framing."""
    cdef const unsigned char[:] view = memoryview(data).cast("B")
    cdef Py_ssize_t n = view.shape[0], pos = 0
    cdef size_t size = 0
    cdef unsigned pid = 0
    cdef packet_status st
    cdef const unsigned char *base
    cdef unsigned char empty = 0
    if not PKT_HEADER <= max_packet_size <= PKT_MAX:
        raise ValueError(f"max_packet_size must be between {PKT_HEADER} and {PKT_MAX}")
    base = &view[0] if n > 0 else &empty
    packets = []
    while True:
        st = packet_scan(base + pos, <size_t>(n - pos), <size_t>max_packet_size, &size, &pid)
        if st == PACKET_PARTIAL:
            return packets, pos, None
        if st != PACKET_OK:
            return packets, pos, _bad_packet_reason(st, size, pid, <size_t>max_packet_size)
        packets.append((pid, PyBytes_FromStringAndSize(<const char *>base + pos + PKT_HEADER,
                                                       <Py_ssize_t>size - PKT_HEADER)))
        pos += <Py_ssize_t>size

def make_packet(int packet_id, payload=b""):
    """Build one packet as bytes: build it once, send it to many (Broadcast)."""
    return _make_packet(packet_id, payload, "make_packet")


cdef bytes _make_packet(int packet_id, payload, str where):
    cdef Py_ssize_t n
    cdef bytes out
    cdef unsigned char *p
    cdef const unsigned char[:] view
    if not 0 <= packet_id <= 0xFFFF:
        raise ValueError(f"packet id {packet_id} out of range 0..65535")
    if not isinstance(payload, bytes) and not PyObject_CheckBuffer(payload):
        raise _not_bytes(where, "payload", payload)
    view = memoryview(payload).cast("B") if not isinstance(payload, bytes) else payload
    n = view.shape[0]
    if n + PKT_HEADER > PKT_MAX:
        raise ValueError(f"payload of {n} bytes is too large for a packet "
                         f"(at most {PKT_MAX - PKT_HEADER})")
    out = PyBytes_FromStringAndSize(NULL, n + PKT_HEADER)
    p = <unsigned char *>PyBytes_AS_STRING(out)
    packet_header(p, packet_id, n)
    if n:
        memcpy(p + PKT_HEADER, &view[0], n)
    return out


cdef class PacketSession(Session):
    """A Session that speaks packets: ``[size: u16][id: u16][payload]``, little-endian,
    ``size`` counting the 4-byte header.

    Override ``OnRecvPacket(packet_id, payload)`` (called once per whole packet, in
    order; ``payload`` is bytes), or set the class attribute ``handler`` to a
    ``PacketHandler`` that routes ids to functions.  ``max_packet_size`` (class
    attribute, at most 65535) bounds what a peer may announce: a size below 4 or above
    it disconnects the session with the reason logged.
    """

    @property
    def max_packet_size(self):
        return self._hooks.max_packet_size

    def SendPacket(self, int packet_id, payload=b""):
        """Send one packet (from any thread); returns as Send does."""
        return self.Send(_make_packet(packet_id, payload, "SendPacket"))

    def OnRecvPacket(self, packet_id, payload):
        """Called once per packet.  The default routes it through the class's
        ``handler`` (a PacketHandler); without one, the packet is unknown."""
        handler = getattr(type(self), "handler", None)
        if handler is not None:
            return handler.dispatch(self, packet_id, payload)
        self.OnUnknownPacket(packet_id, payload)

    def OnUnknownPacket(self, packet_id, payload):
        """A packet nobody handles: logged, and the session is disconnected.  (A peer
        sending unknown ids connection after connection: its service logs a burst's
        first lines and counts the rest, as for bad sizes.)"""
        _log_in_burst(self, LOG_PACKETS, _logging_WARNING,
                      f"disconnecting {repr(self)}: unknown packet id {packet_id} "
                      f"({len(payload)}-byte payload)")
        self.Disconnect(f"unknown packet id {packet_id}")
