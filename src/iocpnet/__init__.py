"""iocpnet: game-style TCP servers and clients built the way Windows IOCP servers are.

A completion port (io_uring or epoll on Linux, IOCP on Windows), worker threads that wait
on it with the GIL released, and each completion routed to the object that owns it.
User code subclasses ``Session`` and overrides ``OnConnected``, ``OnRecv``, ``OnSend``
and ``OnDisconnected``::

    import iocpnet

    class GameSession(iocpnet.Session):
        def OnRecv(self, data):
            self.Send(data)          # echo

    service = iocpnet.Service(iocpnet.IocpCore(), iocpnet.Listener(11021), GameSession, 100)
    service.Run()
"""
import logging as _logging
import typing as _typing

from iocpnet._core import (
    BackendUnavailableError,
    ClientService,
    Group,
    HttpResponse,
    IocpCore,
    IocpObject,
    Listener,
    LogBurst,
    PacketSession,
    Reconnect,
    RecvView,
    RunHandle,
    ServerService,
    Service,
    Session,
    Task,
    Timer,
    WebSocketRequest,
    WebSocketSession,
    available_backends,
    backend_unavailable_reason,
    compiled_backends,
    debug_counters,
    default_workers,
    parse_http_request,
    parse_websocket_frames,
    websocket_accept_key,
)
from iocpnet.packet import (PACKET_HEADER_SIZE, PACKET_SIZE_MAX, PacketHandler, make_packet,
                            scan_packets)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ClientService",
    "Group",
    "HttpResponse",
    "IocpCore",
    "IocpObject",
    "Listener",
    "LogBurst",
    "PACKET_HEADER_SIZE",
    "PACKET_SIZE_MAX",
    "PacketHandler",
    "PacketSession",
    "Reconnect",
    "RecvView",
    "RedisBackplane",
    "RunHandle",
    "ServerService",
    "Service",
    "Session",
    "Task",
    "Timer",
    "WebSocketRequest",
    "WebSocketSession",
    "available_backends",
    "backend_unavailable_reason",
    "compiled_backends",
    "debug_counters",
    "default_workers",
    "make_packet",
    "parse_http_request",
    "parse_websocket_frames",
    "scan_packets",
    "websocket_accept_key",
    "__version__",
]

if _typing.TYPE_CHECKING:
    from iocpnet.backplane import RedisBackplane
else:
    # RedisBackplane is loaded when first named: it imports ssl and hashlib (OpenSSL,
    # ~5 MiB resident), which a server that never uses Redis should not carry.  Hidden
    # from type checkers, which would take any misspelt name for one served here.
    def __getattr__(name: str) -> type:
        if name == "RedisBackplane":
            from iocpnet.backplane import RedisBackplane
            globals()[name] = RedisBackplane
            return RedisBackplane
        raise AttributeError(f"module 'iocpnet' has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(globals()) | {"RedisBackplane"})


# A library logs; the application decides where it goes.
_logging.getLogger("iocpnet").addHandler(_logging.NullHandler())
