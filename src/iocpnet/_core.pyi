"""Type stub of iocpnet._core, the Cython extension: IocpCore.Dispatch, Listener, Session,
Service, jobs and timers.

Kept by hand next to _core.pyx.  scripts/check_types.sh holds it to the compiled module
with mypy's stubtest, and to what user code writes with mypy --strict on examples/ and
tests/typecheck/; tests/test_packaging.py checks that it ships in the wheel.
"""
import concurrent.futures
import logging
import ssl as _ssl
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import Any, Generic, NoReturn, Protocol, SupportsIndex, TypedDict, TypeVar, final, overload

from typing_extensions import Self, TypeVarTuple, Unpack

from iocpnet.backplane import RedisBackplane
# The control plane is plain Python (run.py); the extension imports these from it.
from iocpnet.run import Reconnect as Reconnect
from iocpnet.run import RunHandle as RunHandle

_Ts = TypeVarTuple("_Ts")
_T = TypeVar("_T")
_T_co = TypeVar("_T_co", covariant=True)

# What Send, Broadcast, make_packet and scan_packets take: bytes are queued by
# reference, the others are copied.
_Bytes = bytes | bytearray | memoryview | RecvView

logger: logging.Logger

PACKET_HEADER_SIZE: int
"""4: ``[size: u16 LE][id: u16 LE]``, ``size`` counting the header."""
PACKET_SIZE_MAX: int
"""65535: the largest packet, header included."""
DEFAULT_SEND_QUEUE_LIMIT: int
"""4 MiB: ``Session.send_queue_limit`` unless a subclass sets it."""
DEFAULT_RECV_BUFFER_LIMIT: int
"""256 KiB: ``Session.recv_buffer_limit`` unless a subclass sets it."""
DEFAULT_FLUSH_TIMEOUT: float
"""5 s: ``Session.flush_timeout`` unless a subclass sets it."""
DEFAULT_SEND_TIMEOUT: float
"""10 s: ``Session.send_timeout`` unless a subclass sets it."""
DEFAULT_TLS_HANDSHAKE_TIMEOUT: float
"""10 s: ``Session.tls_handshake_timeout`` unless a subclass sets it."""
DEFAULT_MAX_MESSAGE_SIZE: int
"""1 MiB: ``WebSocketSession.max_message_size`` unless a subclass sets it."""
DEFAULT_SEND_QUEUE_HIGH: int
"""64 KiB: ``Session.send_queue_high`` (or a quarter of ``send_queue_limit`` if less)."""
DEFAULT_POST_QUEUE_LIMIT: int
"""10000: ``Session.post_queue_limit`` and ``Group.post_queue_limit`` unless a subclass
sets it."""
DEFAULT_CORE_POST_QUEUE_LIMIT: int
"""100000: ``IocpCore.post_queue_limit`` unless set."""

class BackendUnavailableError(RuntimeError):
    """The requested completion-port backend cannot run on this machine."""

def available_backends() -> list[str]:
    """The completion-port backends that can run on this machine, best first."""

def compiled_backends() -> list[str]:
    """The backends this build contains (available or not), best first."""

def backend_unavailable_reason(backend: str) -> str | None:
    """Why `backend` cannot run here, or None if it can."""

def default_workers() -> int:
    """The worker threads ``Run()`` starts when not told: 1 with a GIL, one per core (at
    most 8) on free-threaded Python."""
    ...

def debug_counters() -> dict[str, int]:
    """Live objects and operations, for leak checks: every value returns to 0.

    Keys: ``sessions_alive``, ``sessions_connected``, ``views_detached``,
    ``cores_alive``, ``groups_alive``, ``strand_jobs`` (session and group jobs posted
    and not yet run or dropped), ``strand_timers`` (their pending timers), ``tasks``
    (``Spawn`` tasks not yet delivered or dropped)."""

def scan_packets(
    data: _Bytes, max_packet_size: int = 65535
) -> tuple[list[tuple[int, bytes]], int, str | None]:
    """Run PacketSession's framing over ``data`` (bytes-like) without a connection.

    Returns ``(packets, consumed, error)``: the whole packets found as
    ``(packet_id, payload)`` tuples, how many bytes they used (the rest is an
    unfinished packet), and None or the reason a session would be disconnected for.
    Used by tests and tools; the session's own loop uses the same C framing."""

def make_packet(packet_id: int, payload: _Bytes = b"") -> bytes:
    """Build one packet as bytes: build it once, send it to many (Broadcast)."""

class IocpObject:
    """An owner of port operations: the Listener, a Session, a job or a timer.

    The original's ``IocpObject::Dispatch(iocpEvent, numOfBytes)``: each completion is
    routed to the object that submitted the operation.  It stands for native state:
    ``copy.copy``, ``copy.deepcopy`` and pickling raise TypeError (as for an IocpCore,
    a Service and a LogBurst).
    """

    def __reduce_ex__(self, protocol: SupportsIndex, /) -> NoReturn:
        """Refused (TypeError): a copy would share the native state."""

@final
class IocpCore:
    """The completion port: worker threads call ``Dispatch`` to wait for completions and
    route each one to its owner.

    ``IocpCore(backend=None)`` picks the best backend this machine can run (io_uring,
    else epoll; IOCP on Windows); ``backend="epoll"`` or the ``IOCPNET_BACKEND``
    environment variable forces one.  Not copyable nor picklable (TypeError).
    """

    def __reduce_ex__(self, protocol: SupportsIndex, /) -> NoReturn:
        """Refused (TypeError): a copy would share the completion port."""
    # The arguments go to __cinit__, hence __new__ here.
    def __new__(
        cls,
        backend: str | None = None,
        *,
        recv_buffer_size: int = 0,
        recv_buffer_count: int = 0,
        queue_depth: int = 0,
        recv_multishot: bool | None = None,
        recv_pool_window: float = 5.0,
    ) -> IocpCore:
        """Create the port.  Raises BackendUnavailableError when the requested backend
        (or, with none requested, every backend) cannot run here.

        ``recv_buffer_size`` (bytes per receive buffer, default 16 KiB),
        ``recv_buffer_count`` (most receive buffers, default 4096), ``queue_depth``
        (io_uring submission entries, default 4096): 0 keeps the default.
        ``recv_multishot``: keep each receive armed instead of posting one per message
        (None: on for io_uring, where each arming reads at most 64 KiB ahead on kernels
        that can bound it, 6.16+, and receives stay one-shot on older ones; on for
        epoll, where an arming ends after 4 buffers' worth, 64 reads, or the read after
        one that had to wait for a busy hook of its session; off for IOCP).
        ``recv_pool_window`` (seconds, 0.001 to 86400): the receive pool keeps what a
        spike made for one to two windows after the last time it was needed, then gives
        back all but that need (plus a quarter, at least 8 buffers)."""

    @property
    def backend(self) -> str:
        """The backend that runs: "io_uring", "epoll" or "iocp"."""

    @property
    def closed(self) -> bool:
        """True once ``Close()`` has shut the port down."""

    def Dispatch(self, timeout_ms: int = -1, max_batch: int = 128) -> int:
        """Wait up to ``timeout_ms`` (-1: forever) for completions, with the GIL released,
        then dispatch the whole batch to the owners under one GIL hold.

        Returns the number of completions handled: 0 on timeout, -1 at once after
        ``Close()``.  A reply a hook sends leaves before the next hook of the batch runs
        (at once when the socket takes it); whatever else the hooks submitted reaches the
        kernel before ``Dispatch`` returns, so a loop polling ``Dispatch(0)`` once per
        frame reads a message and sends its reply in the same frame.

        A worker handles the batch it took in order, so a hook that blocks delays the
        rest of its batch whatever the number of workers; ``max_batch`` (1 to 128)
        bounds that, at some cost in throughput.
        """

    def Close(self, timeout: float = 5.0) -> None:
        """Stop: disconnect the services using this core, cancel timers and the tasks of
        ``Spawn`` (waited for within ``timeout``), wait (up to the same
        ``timeout`` seconds) for every operation in flight to complete and be
        dispatched (the sessions' ``OnDisconnected`` included), then wake every thread
        in ``Dispatch`` (they return -1) and wait, within the same ``timeout``, for
        them to leave it.  Idempotent, any thread.

        If a hook still runs at the deadline, Close returns then and the core closes by
        itself once the last such hook has returned (``closed`` says when); jobs posted
        (core or group ``Post``) that run after the deadline are dropped, with a
        warning.  Called from a worker thread (inside a hook or job, or a signal
        handler that ran while its thread waited in ``Dispatch``) it does not wait: the
        last completion ends the port.
        """

    def __enter__(self) -> Self:
        """``with IocpCore() as core:`` closes the core at the end of the block; a core
        already closed raises RuntimeError."""

    def __exit__(self, *exc_info: object) -> None:
        """``Close()`` with its default timeout; an exception of the block goes on."""

    def stats(self) -> dict[str, int]:
        """Counters of the port: submitted, completed, in_flight, waits, receive buffers
        (``recv_buffers`` held now and ``recv_buffer_bytes`` their memory,
        ``recv_buffers_out``, ``recv_buffers_detached``, ``recv_buffers_trimmed`` given
        back so far, ``recv_buffers_peak`` the most lent at once in the pool's window)
        and receives waiting for one (``recv_waiting``).  Empty once the port is gone."""

    def Post(self, func: Callable[[Unpack[_Ts]], object], *args: Unpack[_Ts]) -> None:
        """Run ``func(*args)`` on a worker thread (any thread may post).  Exceptions are
        logged; workers go on.  At most ``post_queue_limit`` jobs wait at once: past it
        Post raises ``queue.Full``.  On a closed core: RuntimeError (as ``CallLater``,
        ``CallEvery`` and ``Spawn``)."""

    @property
    def post_queue_limit(self) -> int:
        """Jobs ``Post`` may have waiting at once (default 100000; settable)."""
    @post_queue_limit.setter
    def post_queue_limit(self, n: int) -> None: ...

    def CallLater(
        self, delay: float, func: Callable[[Unpack[_Ts]], object], *args: Unpack[_Ts]
    ) -> Timer:
        """Run ``func(*args)`` on a worker thread after ``delay`` seconds; returns a
        ``Timer`` whose ``Cancel()`` stops it."""

    def CallEvery(
        self, interval: float, func: Callable[[Unpack[_Ts]], object], *args: Unpack[_Ts]
    ) -> Timer:
        """Run ``func(*args)`` on a worker thread every ``interval`` seconds (a game
        tick) until the returned ``Timer`` is cancelled or the core closes.  A fixed
        rate: ticks whose deadline passed while the callback ran are skipped and counted
        in ``Timer.skipped``."""

    def Spawn(
        self,
        awaitable: Coroutine[Any, Any, _T],
        callback: Callable[[Task[_T]], object] | None = None,
    ) -> Task[_T]:
        """Run ``awaitable`` (a coroutine) on this core's asyncio loop thread (started on
        first use, uvloop when it is installed; stopped by ``Close``).  Its outcome
        comes back on a worker: ``callback(task)``; without one an exception is
        logged.  Returns the ``Task``."""

@final
class Task(IocpObject, Generic[_T_co]):
    """An awaitable started by ``Spawn``, running on the core's asyncio loop thread.

    Its outcome comes back on the owner's strand (the session's or group's; any worker
    for ``IocpCore.Spawn``): ``callback(task)`` if one was given, else the owner's
    ``OnTaskDone(task)`` hook if it defines one.  With neither, an exception is logged
    like a hook's (a session is disconnected).  When the owner ends first, the awaitable
    is cancelled and nothing is delivered.
    """

    @property
    def owner(self) -> Session | Group | None:
        """The Session or Group it belongs to (None for ``IocpCore.Spawn``), until its
        outcome has been delivered."""

    def done(self) -> bool:
        """True once the awaitable has finished (or was cancelled)."""

    def cancelled(self) -> bool: ...
    def result(self) -> _T_co:
        """The awaitable's result; raises its exception, or ``asyncio.CancelledError``
        if it was cancelled, or RuntimeError if it has not finished."""

    def exception(self) -> BaseException | None:
        """The exception the awaitable raised, or None."""

    def Cancel(self) -> None:
        """Cancel the awaitable (any thread).  Its callback still runs, with a
        cancelled task, unless the owner has ended."""

@final
class Timer(IocpObject):
    """A pending call made by ``IocpCore.CallLater`` or ``CallEvery``.

    A repeating timer keeps a fixed rate: each deadline is the previous one plus the
    interval, wherever the callback ended.  Deadlines that passed while the callback ran
    (or while every worker was busy) are skipped, never run back to back to catch up,
    and counted in ``skipped``."""

    @property
    def skipped(self) -> int:
        """Ticks of a repeating timer skipped because their deadline had passed."""

    @property
    def cancelled(self) -> bool:
        """``Cancel()`` was called."""

    @property
    def active(self) -> bool:
        """The call is still due (or, for ``CallEvery``, will come again)."""

    def Cancel(self) -> None:
        """Stop the timer (any thread).  A call already running finishes."""

@final
class RecvView:
    """The bytes OnRecv is given: read-only, valid for as long as you hold it.

    It exports them through the buffer protocol (``memoryview(data)``, ``bytes(data)``,
    ``struct.unpack_from``, ``socket.send``...) and behaves like a read-only memoryview
    of format ``"B"``: ``len``, ``data[i]`` (an int), ``data[a:b]`` (a ``bytes`` copy),
    iteration, ``tobytes()``, ``hex()``, ``tolist()``, ``==`` with any bytes-like object,
    ``nbytes``, ``readonly``, ``format``, ``itemsize``, ``ndim``, ``shape``, ``strides``,
    ``obj`` (the view itself), ``cast()``, ``release()`` and ``with data: ...``.  It is
    not a ``memoryview`` subclass: ``isinstance(data, memoryview)`` is False (use
    ``memoryview(data)`` where a real one is needed).

    A view kept after OnRecv returns stays valid and byte-exact; a small message is then
    copied into memory of its own size, so keeping many costs little.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        """Not for user code: the core makes them (TypeError)."""
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def __release_buffer__(self, buffer: memoryview, /) -> None: ...
    def release(self) -> None:
        """Let go of the bytes now (as ``memoryview.release``); later use raises
        ValueError.  Raises BufferError while ``memoryview(view)`` or another export
        of it is alive."""
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc_info: object) -> bool: ...
    def __len__(self) -> int: ...
    def __bytes__(self) -> bytes: ...
    def tobytes(self, order: str | None = None) -> bytes:
        """The bytes, copied."""
    def tolist(self) -> list[int]:
        """The bytes as a list of ints."""
    def hex(self, *args: str | bytes | int) -> str:
        """The bytes as hexadecimal text (the arguments of ``bytes.hex``)."""
    def __reduce_ex__(self, protocol: SupportsIndex, /) -> NoReturn:
        """Refused (TypeError), as for a memoryview: copy the bytes with bytes(view)."""
    def __reduce__(self) -> NoReturn: ...
    def __copy__(self) -> NoReturn: ...
    def __deepcopy__(self, memo: Any, /) -> NoReturn: ...
    def toreadonly(self) -> Self:
        """The view itself: it is read-only already."""
    def cast(self, *args: Any) -> memoryview:
        """A memoryview of these bytes cast to another format or shape (see
        ``memoryview.cast``); it keeps the bytes alive."""
    @overload
    def __getitem__(self, index: SupportsIndex, /) -> int: ...
    @overload
    def __getitem__(self, index: slice, /) -> bytes: ...
    def __setitem__(self, index: object, value: object, /) -> None: ...
    def __iter__(self) -> Iterator[int]: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __ne__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...
    def __sizeof__(self) -> int: ...
    @property
    def obj(self) -> RecvView:
        """The object exporting the bytes: the view itself."""
    @property
    def nbytes(self) -> int: ...
    @property
    def readonly(self) -> bool: ...
    @property
    def format(self) -> str: ...
    @property
    def itemsize(self) -> int: ...
    @property
    def ndim(self) -> int: ...
    @property
    def shape(self) -> tuple[int]: ...
    @property
    def strides(self) -> tuple[int]: ...
    @property
    def suboffsets(self) -> tuple[()]: ...
    @property
    def c_contiguous(self) -> bool: ...
    @property
    def f_contiguous(self) -> bool: ...
    @property
    def contiguous(self) -> bool: ...
    @property
    def released(self) -> bool: ...

class Session(IocpObject):
    """One connection.  Subclass it and override the hooks:

    - ``OnConnected()``: once, after accept or connect.
    - ``OnRecv(data) -> int | None``: ``data`` is a read-only ``RecvView`` of the bytes
      received and not yet consumed (it exports them like a memoryview, and stays valid
      if kept); return how many you consumed (None: all).  The rest is shown again,
      with the next bytes, on the next call.
    - ``OnSend(num_bytes)``: after each completed send.
    - ``OnDisconnected(reason)``: exactly once, whatever ended the session.

    ``Send(data)`` and ``Disconnect(reason)`` may be called from any thread.  Limits are
    class attributes: ``send_queue_limit`` (bytes queued and not yet sent before the
    peer is judged not to be reading), ``recv_buffer_limit`` (bytes OnRecv may leave
    unconsumed), ``flush_timeout`` (seconds to flush queued data when closing),
    ``send_timeout`` (seconds a send queue may go without any progress before the peer
    is judged not to be reading; default 10, 0: never), ``idle_timeout`` (seconds without receiving anything before the service disconnects
    the session; 0 or unset: never), and ``tls_handshake_timeout`` (seconds a TLS
    session has to finish its handshake; default 10, 0: no deadline).  Flood
    protection, off unless set: ``recv_messages_per_second`` / ``recv_messages_burst``
    and ``recv_bytes_per_second`` / ``recv_bytes_burst`` (token buckets; a message is
    one receive, or one packet for a PacketSession; over a limit the session is reset
    with a ``rate limit: ...`` reason).  ``measure_hooks = True`` records each hook's
    time in ``service.stats()``.  They are read once per class.

    With TLS (``Listener(ssl=)``, ``ClientService(ssl=)``) the hooks see plaintext,
    OnConnected runs once the handshake is done, ``OnSend`` counts plaintext, the send
    queue's limits count the records queued (what the session holds for the peer), and
    a graceful close sends close_notify.
    """

    def __init__(self) -> None:
        """A session for one connection (made by the service's factory)."""

    # ---- hooks (the defaults do nothing) ----

    def OnConnected(self) -> None:
        """Called once when the connection is up."""

    def OnRecv(self, data: RecvView) -> int | None:
        """Called with the received bytes not yet consumed; return the number consumed
        (None: all)."""

    def OnSend(self, num_bytes: int) -> None:
        """Called after each completed send with the bytes it sent."""

    def OnDisconnected(self, reason: str) -> None:
        """Called exactly once when the session ends."""

    def OnConnectFailed(self, reason: str) -> None:
        """Client sessions: the connection could not be made (OnDisconnected follows)."""

    def OnSendQueue(self, high: bool) -> None:
        """The send queue passed ``send_queue_high`` (True) or fell back to
        ``send_queue_low`` (False): asyncio's pause_writing / resume_writing.  Runs on
        the session's strand, shortly after the Send that crossed the mark."""

    def OnTaskDone(self, task: Task[Any]) -> None:
        """A task from ``Spawn`` without a callback has finished (on the strand)."""

    # ---- state ----

    @property
    def address(self) -> tuple[str, int] | None:
        """The peer's (host, port), or None before the connection."""

    @property
    def connected(self) -> bool:
        """True from OnConnected until the session starts closing."""

    @property
    def disconnect_reason(self) -> str | None:
        """Why the session ended (or is ending), else None."""

    # ---- TLS: None without TLS, and until the handshake is done ----

    @property
    def tls_version(self) -> str | None:
        """The TLS version negotiated ("TLSv1.2", "TLSv1.3")."""

    @property
    def tls_alpn(self) -> str | None:
        """The ALPN protocol agreed on, or None if none was."""

    @property
    def tls_cipher(self) -> tuple[str, str, int] | None:
        """(name, protocol, secret bits) of the cipher in use."""

    @property
    def tls_peer_certificate(self) -> dict[str, Any] | None:
        """The peer's certificate as ``ssl.SSLSocket.getpeercert()`` gives it (a dict,
        when the context verified it), or None."""

    @property
    def tls_peer_certificate_der(self) -> bytes | None:
        """The peer's certificate in DER (bytes), verified or not, or None."""

    @property
    def service(self) -> Service | None:
        """The service the session belongs to (None before it is attached)."""

    def GetService(self) -> Service | None:
        """The original's ``GetService()``: the same as ``service``."""

    @property
    def send_queue_limit(self) -> int:
        """Most bytes queued and not yet sent (class attribute; default 4 MiB).
        Receiving pauses at a quarter of it; past it the session is aborted."""

    @property
    def recv_buffer_limit(self) -> int:
        """Most bytes OnRecv may leave unconsumed (class attribute; default 256 KiB)."""

    @property
    def flush_timeout(self) -> float:
        """Seconds to flush queued data after Disconnect or the peer's close (class
        attribute; default 5)."""

    @property
    def send_timeout(self) -> float:
        """Seconds a send queue may go without progress before the session is ended
        (class attribute; default 10; 0: never)."""

    @property
    def send_queue_bytes(self) -> int:
        """Bytes queued and not yet sent: what ``send_queue_limit`` and
        ``send_queue_high`` are compared with (with TLS: the records, overhead
        included)."""

    @property
    def send_queue_high(self) -> int:
        """``OnSendQueue(True)`` at this many queued bytes (class attribute; default
        64 KiB, or a quarter of ``send_queue_limit`` if less)."""

    @property
    def send_queue_low(self) -> int:
        """``OnSendQueue(False)`` once the queue is down to this (class attribute;
        default a quarter of ``send_queue_high``)."""

    @property
    def groups(self) -> list[Group]:
        """A snapshot of the groups this session is in."""

    # ---- actions ----

    def Send(self, data: _Bytes, /) -> bool:
        """Queue ``data`` to be sent, in order, from any thread.

        ``bytes`` are queued by reference (a packet broadcast to many sessions is built
        once); other buffers are copied.  Returns False if the session is not connected
        (or is closing).  Past ``send_queue_limit`` unsent bytes the peer is judged not to
        be reading: the session is disconnected and False returned.
        """

    def Disconnect(self, reason: object = "disconnected") -> bool:
        """End the session (idempotent, any thread): no more OnRecv; what Send already
        queued is still sent (up to ``flush_timeout`` seconds), then the socket closes
        and OnDisconnected(reason) runs.  Returns True if this call started it.
        ``reason``: any object, shown as its str (None or "": "disconnected")."""

    def Abort(self, reason: object = "aborted") -> bool:
        """End the session at once: queued data is dropped and the peer sees a reset."""

    # ---- the session's strand ----

    def Post(self, func: Callable[[Unpack[_Ts]], object], *args: Unpack[_Ts]) -> bool:
        """Run ``func(*args)`` on this session's strand: never at the same time as its
        hooks, after what the strand already has (any thread may post).  Returns False
        if the session has ended; a job still queued when it ends is dropped.  At most
        ``post_queue_limit`` (class attribute, 10000) jobs wait at once: past it Post
        raises ``queue.Full`` (posting faster than the strand runs them grew its queue,
        and delayed its own receives and its end, without limit)."""

    def CallLater(
        self, delay: float, func: Callable[[Unpack[_Ts]], object], *args: Unpack[_Ts]
    ) -> Timer:
        """Run ``func(*args)`` on the session's strand after ``delay`` seconds; returns a
        ``Timer``.  Cancelled when the session ends; after its end (or its core's
        Close), the Timer comes back already cancelled."""

    def CallEvery(
        self, interval: float, func: Callable[[Unpack[_Ts]], object], *args: Unpack[_Ts]
    ) -> Timer:
        """Run ``func(*args)`` on the session's strand every ``interval`` seconds until
        the Timer is cancelled or the session ends."""

    def Spawn(
        self,
        awaitable: Coroutine[Any, Any, _T],
        callback: Callable[[Task[_T]], object] | None = None,
    ) -> Task[_T]:
        """Run ``awaitable`` (a coroutine) on the core's asyncio loop thread, without
        holding a worker; its outcome comes back on this session's strand:
        ``callback(task)``, else the ``OnTaskDone(task)`` hook; with neither, an
        exception is handled like a hook's.  Cancelled when the session ends (nothing
        is delivered then).  Returns the ``Task``."""

class Group(IocpObject):
    """A set of sessions with a strand of its own: a room, a channel, a match.

    ``Group(core_or_service, name=None, *, backplane=None)``.  ``Add(session, name)`` /
    ``Remove(session)`` from any thread; a member is removed when its session ends; a
    session may be in many groups.  ``Broadcast(data)`` queues one ``bytes`` object to
    every member, by reference, in one total order per group.  ``len(group)``,
    ``session in group``, iteration over a snapshot.  With ``backplane`` (a
    ``RedisBackplane``) the group is shared with every server on the same Redis: one
    order for the members of all of them, and ``Who`` lists them all.

    ``Post``, ``CallLater``, ``CallEvery`` and ``Spawn`` run on the group's strand: never
    two at a time, in order, so room state touched only from there needs no lock.
    ``Close()`` cancels them and removes every member.  Subclass it to give a room its
    state and its ``OnTaskDone(task)`` hook.
    """

    def __init__(
        self,
        core: IocpCore | Service,
        name: object = None,
        *,
        backplane: RedisBackplane | None = None,
    ) -> None: ...
    @property
    def name(self) -> object:
        """The name given (any object; None by default)."""

    @property
    def backplane(self) -> RedisBackplane | None:
        """The RedisBackplane that shares this group, or None."""

    @property
    def names(self) -> list[str]:
        """The names of the members here (this process), in the order they joined."""

    def NameOf(self, session: Session) -> str | None:
        """The name `session` was given when it joined (None if it is not a member)."""

    def Rename(self, session: Session, name: str) -> bool:
        """Change the name `session` is listed under (any thread).  Returns False if it
        is not a member."""

    def Who(
        self, callback: Callable[[list[str]], object] | None = None
    ) -> concurrent.futures.Future[list[str]]:
        """Who is in the group, by name: a ``concurrent.futures.Future`` of the list.
        A shared group asks Redis (every server's members; this server's only while
        Redis is away); a local group answers with ``names``.  ``callback(names)``, if
        given, runs on the group's strand."""

    def _deliver(
        self, data: bytes, exclude: Session | None = None, droppable: bool = False
    ) -> int:
        """The fan-out itself, for the backplane: a shared group's message, back from
        Redis (or delivered here directly while Redis is away)."""

    @property
    def members(self) -> list[Session]:
        """A snapshot of the members, in the order they joined."""

    @property
    def closed(self) -> bool: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Session]:
        """Iterate over a snapshot: members may come and go meanwhile."""

    def __contains__(self, session: object, /) -> bool: ...
    def __bool__(self) -> bool: ...
    def Add(self, session: Session, name: str | None = None) -> bool:
        """Make `session` a member (any thread).  Returns True if it joined, False if it
        was already a member, is not connected (it joins nothing after it ends) or the
        group is closed (a Close on another thread is a race the caller cannot avoid,
        as a session's end is).
        ``name``: what presence lists it as (``names``, ``Who``); default: its
        address as ``host:port``."""

    def Remove(self, session: Session) -> bool:
        """Take `session` out (any thread).  Returns True if it was a member."""

    def Broadcast(
        self, data: _Bytes, exclude: Session | None = None, *, droppable: bool = False
    ) -> int:
        """Queue ``data`` to every member (any thread), the same ``bytes`` object by
        reference, in one order per group: every member hears the group's messages in
        the same order.  ``exclude``: a session to skip (say, the sender).
        ``droppable=True`` (a state update the next one replaces) skips members whose
        send queue is above their ``send_queue_high`` mark, so a slow reader misses
        updates instead of reaching its ``send_queue_limit``.  Returns how many members
        took it (a member closing, or over its send-queue limit, does not).  A
        Broadcast made from inside a fan-out (a member's own ``Send`` that broadcasts,
        to this group or another) does not wait for it: its message goes after the one
        under way, and it returns how many members it is meant for.

        A shared group (``backplane=``) publishes the message to Redis and delivers it
        to the members here when it comes back on the group's channel, so that every
        server's members hear one order, the sender's too; the return value is then the
        number of members here it is meant for.  While Redis is away it is delivered
        here at once."""

    def Post(self, func: Callable[[Unpack[_Ts]], object], *args: Unpack[_Ts]) -> bool:
        """Run ``func(*args)`` on the group's strand (any thread may post).  Returns False
        if the group is closed (or the core is).  At most ``post_queue_limit`` jobs wait
        at once (a class attribute, default 10000): past it Post raises ``queue.Full``.
        A room whose players each post their moves needs room for every player's burst:
        the bound is shared, and the one who posts when it is full gets the error."""

    def CallLater(
        self, delay: float, func: Callable[[Unpack[_Ts]], object], *args: Unpack[_Ts]
    ) -> Timer:
        """Run ``func(*args)`` on the group's strand after ``delay`` seconds; returns a
        ``Timer``.  Cancelled by ``Close``; after it (or the core's Close), the Timer
        comes back already cancelled."""

    def CallEvery(
        self, interval: float, func: Callable[[Unpack[_Ts]], object], *args: Unpack[_Ts]
    ) -> Timer:
        """Run ``func(*args)`` on the group's strand every ``interval`` seconds (a room's
        tick) until the Timer is cancelled, the group closed or the core closed."""

    def Spawn(
        self,
        awaitable: Coroutine[Any, Any, _T],
        callback: Callable[[Task[_T]], object] | None = None,
    ) -> Task[_T]:
        """Run ``awaitable`` on the core's asyncio loop thread; its outcome comes back on
        the group's strand (``callback(task)``, else the ``OnTaskDone(task)`` hook).
        Cancelled by ``Close``."""

    def Close(self) -> None:
        """End the group (idempotent, any thread): every member is removed, its pending
        timers and tasks are cancelled, and nothing more runs on its strand.  A shared
        group stops listening to its channel and takes its members out of presence."""

class PacketSession(Session):
    """A Session that speaks packets: ``[size: u16][id: u16][payload]``, little-endian,
    ``size`` counting the 4-byte header.

    Override ``OnRecvPacket(packet_id, payload)`` (called once per whole packet, in
    order; ``payload`` is bytes), or set the class attribute ``handler`` to a
    ``PacketHandler`` that routes ids to functions.  ``max_packet_size`` (class
    attribute, at most 65535) bounds what a peer may announce: a size below 4 or above
    it disconnects the session with the reason logged.
    """

    @property
    def max_packet_size(self) -> int:
        """The largest packet a peer may announce (class attribute; default 65535)."""

    def SendPacket(self, packet_id: int, payload: _Bytes = b"") -> bool:
        """Send one packet (from any thread); returns as Send does."""

    def OnRecvPacket(self, packet_id: int, payload: bytes) -> object:
        """Called once per packet.  The default routes it through the class's
        ``handler`` (a PacketHandler); without one, the packet is unknown."""

    def OnUnknownPacket(self, packet_id: int, payload: bytes) -> object:
        """A packet nobody handles: logged, and the session is disconnected."""

@final
class LogBurst:
    """A log line that a peer can make a server repeat at will, bounded per burst.

    ``log(level, msg)`` from any thread: the first ``lines`` of a burst are logged in
    full; the rest are counted, and the count is written once the burst has been quiet
    for a second (and once a minute while it lasts) as ``... and K more <what> in the
    last T s (the last: <msg>)``, at the highest level among them; ``flush()`` writes
    it at once.  ``what`` is plural ("malformed packets").  ``logger``: default iocpnet's.  The library's own such lines
    (failed TLS handshakes, bad packets, rate limit cuts...) go through one per service
    and kind."""

    def __init__(self, core: IocpCore, what: str, lines: int = 5,
                 logger: logging.Logger | None = None) -> None: ...
    def __reduce_ex__(self, protocol: SupportsIndex, /) -> NoReturn:
        """Refused (TypeError): a copy would share the burst's count."""
    def log(self, level: int, msg: str) -> bool:
        """Log `msg` at `level`: in full while this burst lets it through (True), else
        counted in the burst's line (False)."""
    def flush(self) -> bool:
        """Write the count of what this burst holds now (any thread): True if a line
        was written, False if nothing was held (so a second flush writes nothing).
        For an application that shuts down its own way: the core's timer may never
        write it.  The burst goes on: later lines are still counted until it is quiet
        for a second."""

@final
class Listener(IocpObject):
    """Accepts connections: binds, listens, and keeps ``max_session_count`` accepts
    posted, each with a session made by the service's factory, re-posting each one as
    it completes (the original's AcceptEx pattern).

    ``address``: an int port (all interfaces) or a ``(host, port)`` tuple; port 0 picks
    a free port, readable as ``.port`` after ``Start()``.  ``ssl``: an
    ``ssl.SSLContext`` (server side): every connection speaks TLS, and the sessions'
    hooks see plaintext (OnConnected once the handshake is done).
    """

    def __init__(
        self,
        address: int | tuple[str | None, int] | list[str | int | None],
        *,
        backlog: int = 1024,
        reuse_port: bool = False,
        ipv6_only: bool = False,
        ssl: _ssl.SSLContext | None = None,
        websocket: bool = False,
    ) -> None:
        """``reuse_port``: SO_REUSEPORT, several processes share the port.
        ``ipv6_only``: an IPv6 listener that does not take IPv4 (a wildcard listener is
        dual-stack otherwise).  ``websocket``: every session accepted here speaks
        WebSocket (a PacketSession's packets then travel in binary messages)."""

    @property
    def websocket(self) -> bool:
        """Whether sessions accepted here speak WebSocket."""

    @property
    def backlog(self) -> int:
        """The listen() backlog."""

    @property
    def ssl(self) -> _ssl.SSLContext | None:
        """The server-side TLS context, or None."""

    @property
    def accepted(self) -> int:
        """Connections accepted so far."""

    @property
    def accept_errors(self) -> int:
        """Accepts that failed (the listener goes on)."""

    @property
    def port(self) -> int:
        """The bound port (after Start)."""

    @property
    def address(self) -> tuple[str | None, int]:
        """The bound (host, port) after Start; before, the address given."""

    @property
    def accepts_posted(self) -> int:
        """Accept slots ready: accepts in flight, or with ``multishot`` the sessions
        made ahead for the next connections."""

    @property
    def multishot(self) -> bool:
        """One accept operation serves every connection (io_uring on Linux 5.19+),
        instead of one posted per slot."""

    def Close(self) -> None:
        """Stop accepting: cancel the posted accepts and close the listening socket."""

class _SessionFigures(TypedDict):
    live: int
    total: int

class _RefusedFigures(TypedDict):
    max_sessions: int
    max_sessions_per_address: int
    connect_rate_per_address: int
    shutdown: int
    bad_session_class: int

class _DisconnectFigures(TypedDict):
    closed: int
    peer_closed: int
    reset: int
    timeout: int
    limit: int
    protocol: int
    hook_error: int
    error: int
    shutdown: int
    connect_failed: int

class _HookFigures(TypedDict):
    count: int
    seconds: float
    seconds_max: float

class _DispatchFigures(TypedDict):
    batches: int
    completions: int
    batch_max: int
    batch_sizes: dict[int, int]
    seconds: float
    seconds_max: float

class _AddressTableFigures(TypedDict):
    live: int
    recent: int
    evictions: int

class _ServiceFigures(TypedDict, total=False):
    backend: str
    sessions: _SessionFigures
    accepts: int
    accept_errors: int
    factory_failures: int
    idle_disconnects: int
    send_timeouts: int
    refused: _RefusedFigures
    disconnects: _DisconnectFigures
    bytes_in: int
    bytes_out: int
    messages_in: int
    messages_out: int
    send_queue_bytes: int
    send_queue_bytes_max: int
    hooks: dict[str, _HookFigures]
    dispatch: _DispatchFigures
    address_table: _AddressTableFigures
    connect_failures: int

class _MetricsServer(Protocol):
    """What ServeMetrics returns (iocpnet.metrics.MetricsServer)."""

    @property
    def port(self) -> int: ...
    def Close(self) -> None: ...

class Service:
    """The original's Service: an IocpCore, a Listener, a session factory and the number
    of accepts kept posted: ``Service(core, listener, factory, 100)`` as the original's
    main.cpp writes it, or ``accepts=100``.  That number is not a cap on sessions (each
    completed accept is posted again at once): ``max_sessions`` is the cap.
    ``listener`` may also be the address itself (a port or a ``(host, port)`` tuple,
    as the original passes a NetAddress): the service makes a ``Listener`` for it.
    ``max_session_count`` (the original's name, as a keyword or an attribute) is an
    alias of ``accepts`` for one release; the keyword warns (DeprecationWarning).

    ``Start()`` binds, listens and posts the accepts; worker threads then loop
    ``service.GetIocpCore().Dispatch()``.  ``Run()`` does all of it and returns
    after ``Stop()``, SIGINT or SIGTERM, with a graceful shutdown.
    """

    def __reduce_ex__(self, protocol: SupportsIndex, /) -> NoReturn:
        """Refused (TypeError): a copy would share the listener and sessions."""

    def __init__(
        self,
        core: IocpCore,
        listener: Listener | int | tuple[str | None, int],
        session_factory: Callable[[], Session],
        accepts: int | None = None,
        *,
        max_sessions: int | None = None,
        max_sessions_per_address: int | None = None,
        connect_rate_per_address: float | None = None,
        connect_burst_per_address: float | None = None,
        address_table_size: int = 16384,
        max_session_count: int | None = None,
    ) -> None:
        """``session_factory``: a Session subclass, or any callable returning a new
        Session.  ``max_sessions``: refuse connections beyond this many live sessions
        (None: no cap).  Per remote address: ``max_sessions_per_address`` live sessions,
        ``connect_rate_per_address`` new connections per second (a token bucket of
        ``connect_burst_per_address``, default one second's worth); the rate table
        remembers at most ``address_table_size`` addresses.  A connection over a limit
        is closed with a reset before any hook runs."""

    @property
    def core(self) -> IocpCore:
        """The completion port this service runs on."""

    @property
    def listener(self) -> Listener:
        """The Listener (a ClientService has none: there it is None)."""

    @property
    def accepts(self) -> int:
        """Accepts kept posted (the original's maxSessionCount; default 100)."""

    @property
    def max_session_count(self) -> int:
        """The original's name of ``accepts`` (an alias, for one release)."""

    @property
    def max_sessions(self) -> int | None:
        """The cap on live sessions, or None."""

    @property
    def rejected(self) -> int:
        """Connections refused over ``max_sessions``."""

    @property
    def total_sessions(self) -> int:
        """Sessions that have connected (or, for a client, started connecting)."""

    @property
    def idle_disconnects(self) -> int:
        """Sessions disconnected by their ``idle_timeout``."""

    @property
    def send_timeouts(self) -> int:
        """Sessions ended by their ``send_timeout`` (a send queue that made no
        progress: the peer is not reading)."""

    @property
    def factory_failures(self) -> int:
        """Calls of the session factory that raised or returned a non-Session while
        refilling an accept slot (the slot is retried with a growing back-off)."""

    @property
    def session_count(self) -> int:
        """Live sessions (connected, or closing and not yet disconnected)."""

    @property
    def sessions(self) -> list[Session]:
        """A snapshot of the live sessions."""

    def GetIocpCore(self) -> IocpCore:
        """The original's ``GetIocpCore()``: the same as ``core``."""

    def CreateSession(self) -> Session:
        """A new session from the factory (the original's ``CreateSession()``)."""

    def Start(self, workers: int = 0) -> RunHandle:
        """Make one session with the factory (its exception, if it raises, is Start's),
        then bind, listen and post the accepts, and return a ``RunHandle`` at once (its
        ``.port`` is the bound port, useful with ``Listener(0)``).  With ``workers=N``
        it also starts N worker threads looping ``Dispatch``; ``handle.Stop()`` (or
        leaving ``with service.Start(workers=2) as handle:``) shuts down as ``Run``
        does.  With ``workers=0`` your own threads call ``Dispatch``.  A stopped service
        cannot start again, nor one on a closed core (RuntimeError)."""

    def Stop(self, timeout: float = 5.0) -> None:
        """Graceful shutdown (any thread): stop accepting, let the hooks running finish
        (what they send is flushed, as is everything queued, up to ``flush_timeout``),
        start no new OnRecv, disconnect every session, and wait up to ``timeout``
        seconds for them to finish, whatever a hook does; the warning then names each
        session still open and the hook it is in.  From a worker thread it does not
        wait.  Under ``Run`` it also makes ``Run`` return."""

    def stats(self) -> _ServiceFigures:
        """The service's figures: sessions, accepts, refusals and disconnects by reason,
        bytes and messages in and out, send-queue bytes, hook time (``measure_hooks``
        classes), dispatch batches of the core.  O(live sessions): call it every few
        seconds, not per message."""

    def ServeMetrics(self, port: int = 0, host: str = "127.0.0.1", *,
                     name: str | None = None, request_timeout: float | None = None,
                     max_connections: int | None = None) -> _MetricsServer:
        """Serve stats() over HTTP for Prometheus (needs ``iocpnet[metrics]``); returns
        the server (``.port``, ``.Close()``), closed by ``Stop()``.  After ``Stop()``:
        RuntimeError.  ``request_timeout`` and ``max_connections`` go to
        ``MetricsServer`` (None: its defaults, 10 s and 32)."""

    def Broadcast(self, data: _Bytes, sessions: Iterable[Session] | None = None) -> int:
        """Send the same bytes to every live session (or to ``sessions``), queued by
        reference: the packet is built once.  Returns how many sessions took it."""

    def Run(
        self,
        workers: int | None = None,
        *,
        seconds: float | None = None,
        shutdown_timeout: float = 5.0,
    ) -> None:
        """Start, run ``workers`` threads looping Dispatch, and return after ``Stop()``,
        SIGINT or SIGTERM (or after ``seconds``, if given), with a graceful shutdown:
        stop accepting, disconnect the sessions, drain the operations, join the workers,
        close the core, all within ``shutdown_timeout`` seconds whatever a hook does.  A
        second SIGINT/SIGTERM stops at once.  ``workers=None``: ``default_workers()``."""

# The original's name for the accepting service: Service itself (an alias).
ServerService = Service

class _ReconnectPolicy(Protocol):
    """What ClientService needs of a reconnect policy (``Reconnect`` is one)."""

    @property
    def max_attempts(self) -> int | None: ...
    def delay(self, failures: int, /) -> float: ...

class ClientService(Service):
    """Connects ``count`` client sessions to ``address`` (dummy clients, server to
    server links), IPv4 or IPv6.  Each session gets the usual hooks; a connection that
    cannot be made gets ``OnConnectFailed(reason)`` then ``OnDisconnected(reason)``.
    With ``reconnect`` (True, or a ``Reconnect`` policy) every session that ends is
    replaced by a new connection after the policy's delay, until ``Stop()``.
    ``ssl``: an ``ssl.SSLContext`` (client side): the sessions speak TLS, sending
    ``server_hostname`` (default: the address's host) for SNI and certificate checks;
    a failed handshake is a failed connection (OnConnectFailed).
    """

    def __init__(
        self,
        core: IocpCore,
        address: str | int | tuple[str, int] | list[str | int],
        session_factory: Callable[[], Session] | Callable[[int], Session],
        count: int = 1,
        *,
        reconnect: bool | _ReconnectPolicy | None = None,
        ssl: _ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        """``address``: ``(host, port)``, a port on 127.0.0.1, or a ``ws://`` or
        ``wss://`` URL (the sessions then speak WebSocket as clients; wss without ``ssl``
        verifies the server with the system's CAs)."""

    @property
    def ssl(self) -> _ssl.SSLContext | None:
        """The client-side TLS context, or None."""

    @property
    def server_hostname(self) -> str | None:
        """The name sent for SNI and checked against the certificate (TLS only)."""

    @property
    def listener(self) -> None:  # type: ignore[override]
        """A client service has no Listener."""

    @property
    def address(self) -> tuple[str, int]:
        """The server's (host, port)."""

    @property
    def count(self) -> int:
        """Connections opened by ``Start()``."""

    @property
    def reconnect(self) -> _ReconnectPolicy | None:
        """The reconnect policy, or None."""

    @property
    def connect_failures(self) -> int:
        """Connection attempts that failed."""

    def Start(self, workers: int = 0) -> RunHandle:
        """Open the connections; returns a ``RunHandle`` (``workers=N`` starts worker
        threads, as ``Service.Start`` does)."""

    def Connect(self, session: Session | None = None) -> Session:
        """Open one more connection, with `session` or a new one from the factory;
        returns the session (connecting).  A factory that takes one argument is given
        the session's index: 0 to count-1 for the first ones, the next numbers after;
        a reconnect keeps the index of the session it replaces.  On a stopped service
        or a closed core: RuntimeError, saying which."""

def websocket_accept_key(key: str | bytes) -> str:
    """The Sec-WebSocket-Accept value for a Sec-WebSocket-Key (RFC 6455 4.2.2)."""

class HttpResponse:
    """An HTTP answer instead of the WebSocket upgrade.  ``OnUpgrade`` returns one to
    refuse a request (403, 404...) or to answer a plain HTTP request (200 and a page);
    the connection closes once it is sent."""

    status: int
    body: bytes
    content_type: str
    headers: dict[str, str]

    def __init__(
        self,
        status: int,
        body: bytes | str = b"",
        content_type: str = "text/plain; charset=utf-8",
        headers: dict[str, str] | None = None,
    ) -> None: ...

class WebSocketRequest:
    """The HTTP request of a WebSocket upgrade (or any HTTP request the server got), as
    ``OnUpgrade`` sees it.  ``headers`` maps lower-case names to values (a repeated
    header's values joined with ", ")."""

    method: str
    path: str
    headers: dict[str, str]

    def __init__(self, method: str, path: str, headers: dict[str, str]) -> None: ...
    @property
    def host(self) -> str | None: ...
    @property
    def origin(self) -> str | None: ...
    @property
    def subprotocols(self) -> list[str]:
        """The subprotocols the client offers, in its order of preference."""
    @property
    def is_websocket(self) -> bool:
        """Whether this is a WebSocket upgrade request at all (Upgrade: websocket and
        Connection: upgrade); a plain HTTP request is not."""

def parse_http_request(
    data: _Bytes, max_header_size: int = 8192, max_headers: int = 64
) -> tuple[WebSocketRequest | None, int]:
    """Parse the HTTP upgrade request at the start of ``data`` the way a WebSocket
    server does.  Returns ``(request, used)``: a ``WebSocketRequest`` (None if the head
    is not complete yet) and the bytes it used.  Raises ``ValueError("<status>
    <reason>")`` for what a server answers with 400 or 431."""

class WebSocketSession(Session):
    """A WebSocket (RFC 6455) endpoint: a server session once its upgrade succeeded, or
    a client session of a ``ClientService`` given a ``ws://`` URL.

    Hooks: ``OnConnected()`` (after the handshake), ``OnMessage(data, binary)``,
    ``OnDisconnected(reason)`` and, on a server, ``OnUpgrade(request)``.  Settings are
    class attributes: ``max_message_size`` (1 MiB), ``ping_interval`` and
    ``ping_timeout`` (20 s; 0 turns the keepalive off), ``close_timeout`` (5 s),
    ``handshake_timeout`` (10 s), ``max_header_size`` (8192), ``max_headers`` (64),
    ``subprotocols``, ``origins`` (server) and ``origin`` (client).
    """

    def OnMessage(self, data: str | bytes, binary: bool) -> object:
        """Called once per whole message, in order: ``str`` for text, ``bytes`` for
        binary."""

    def OnUpgrade(self, request: WebSocketRequest) -> str | HttpResponse | None:
        """Server: None accepts the upgrade, a str accepts it with that subprotocol,
        an ``HttpResponse`` answers the request instead (403, or 200 with a page)."""

    def SendMessage(self, data: str | _Bytes) -> bool:
        """Send one message (any thread): text for a ``str``, binary for bytes-like.
        False if the WebSocket is not open."""

    def Close(self, code: int = 1000, reason: str = "") -> bool:
        """Start the close handshake (any thread); False if one is already under way."""

    @property
    def subprotocol(self) -> str | None:
        """The subprotocol agreed in the handshake, or None."""

    @property
    def request(self) -> WebSocketRequest | None:
        """Server: the upgrade request once it has arrived."""

    @property
    def close_code(self) -> int:
        """The code of the close frame received (1005: it had none; 1006: none came)."""

    @property
    def close_reason(self) -> str | None:
        """The reason of the close frame received, or None."""

    @property
    def max_message_size(self) -> int:
        """The largest message accepted (class attribute; default 1 MiB)."""

def parse_websocket_frames(
    data: _Bytes, server: bool = True, max_message_size: int = ...
) -> tuple[list[tuple[object, ...]], tuple[int, str] | None]:
    """Run the WebSocket frame parser over ``data`` without a connection, as a server
    (frames must be masked) or a client would.  Returns ``(events, error)``: events
    ``("text", str)``, ``("binary", bytes)``, ``("ping", bytes)``, ``("pong", bytes)``,
    ``("close", code, reason)``; error None or ``(close_code, reason)``."""
