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
from typing import Any, Callable, Dict, Optional, TypeVar

from iocpnet._core import PACKET_HEADER_SIZE, PACKET_SIZE_MAX, make_packet, scan_packets

__all__ = ["PacketHandler", "make_packet", "scan_packets", "PACKET_HEADER_SIZE",
           "PACKET_SIZE_MAX"]

# A route: func(session, payload).  The session is typed Any so that a route may name
# its own PacketSession subclass; route() hands the function back unchanged.
Route = Callable[[Any, bytes], object]
_R = TypeVar("_R", bound=Route)
# on_unknown's function: func(session, packet_id, payload).
UnknownRoute = Callable[[Any, int, bytes], object]


class PacketHandler:
    """A registry from packet id to ``func(session, payload)``."""

    def __init__(self, unknown: Optional[UnknownRoute] = None) -> None:
        self._routes: Dict[int, Route] = {}
        self._lock = threading.Lock()
        self._unknown = unknown

    def route(self, packet_id: int) -> Callable[[_R], _R]:
        """Decorator: ``@handler.route(PKT_LOGIN)`` registers the function for that id."""
        def register(func: _R) -> _R:
            self.register(packet_id, func)
            return func
        return register

    def register(self, packet_id: int, func: Route) -> None:
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

    def routes(self) -> Dict[int, Route]:
        return dict(self._routes)

    def dispatch(self, session: Any, packet_id: int, payload: bytes) -> object:
        func = self._routes.get(packet_id)
        if func is None:
            return self.on_unknown(session, packet_id, payload)
        return func(session, payload)

    def on_unknown(self, session: Any, packet_id: int, payload: bytes) -> object:
        """The one place unknown ids go.  Default: the session's OnUnknownPacket (which
        logs and disconnects)."""
        if self._unknown is not None:
            return self._unknown(session, packet_id, payload)
        return session.OnUnknownPacket(packet_id, payload)
