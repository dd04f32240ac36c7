"""Packet routing for PacketSession: ids to handler functions.

    handler = iocpnet.PacketHandler()

    @handler.route(PKT_CHAT)
    def on_chat(session, payload):
        ...

    class ChatSession(iocpnet.PacketSession):
        handler = handler

Packets whose id has no route go to one place, ``on_unknown`` (override it in a
subclass, or pass ``unknown=`` a function): by default the session is told
(``OnUnknownPacket``), which logs and disconnects it.
"""
import threading

from iocpnet._core import PACKET_HEADER_SIZE, PACKET_SIZE_MAX, make_packet, scan_packets

__all__ = ["PacketHandler", "make_packet", "scan_packets", "PACKET_HEADER_SIZE",
           "PACKET_SIZE_MAX"]


class PacketHandler:
    """A registry from packet id to ``func(session, payload)``."""

    def __init__(self, unknown=None):
        self._routes = {}
        self._lock = threading.Lock()
        self._unknown = unknown

    def route(self, packet_id):
        """Decorator: ``@handler.route(PKT_LOGIN)`` registers the function for that id."""
        def register(func):
            self.register(packet_id, func)
            return func
        return register

    def register(self, packet_id, func):
        if not 0 <= packet_id <= 0xFFFF:
            raise ValueError(f"packet id {packet_id} out of range 0..65535")
        if not callable(func):
            raise TypeError("the handler must be callable")
        with self._lock:
            if packet_id in self._routes:
                raise ValueError(f"packet id {packet_id} already routed to "
                                 f"{self._routes[packet_id]!r}")
            # Copy-on-write: dispatch reads the dict without taking the lock.
            routes = dict(self._routes)
            routes[packet_id] = func
            self._routes = routes

    def routes(self):
        return dict(self._routes)

    def dispatch(self, session, packet_id, payload):
        func = self._routes.get(packet_id)
        if func is None:
            return self.on_unknown(session, packet_id, payload)
        return func(session, payload)

    def on_unknown(self, session, packet_id, payload):
        """The one place unknown ids go.  Default: the session's OnUnknownPacket (which
        logs and disconnects)."""
        if self._unknown is not None:
            return self._unknown(session, packet_id, payload)
        return session.OnUnknownPacket(packet_id, payload)
