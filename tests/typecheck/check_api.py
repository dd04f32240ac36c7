"""A typed tour of iocpnet's public API, for ``mypy --strict`` (scripts/check_types.sh).

It is never run, only type-checked: it holds the stub (src/iocpnet/_core.pyi) and the
annotations of the pure-Python modules to what user code writes.  Lines ending in
``# type: ignore[code]`` are mistakes the types must catch: --strict warns about an
ignore that is not needed, so a stub that grew too loose fails the check.
"""
from __future__ import annotations

import threading
from typing import Dict, List, Optional, Tuple

import iocpnet
from iocpnet import PacketHandler


class Echo(iocpnet.Session):
    send_queue_limit = 1 << 20          # limits are class attributes of a subclass
    recv_buffer_limit = 64 * 1024
    flush_timeout = 2.0
    idle_timeout = 30.0
    recv_messages_per_second = 100      # flood protection (off unless set)
    recv_bytes_per_second = 64 * 1024
    measure_hooks = True                # hook times in service.stats()

    def OnConnected(self) -> None:
        peer: Optional[Tuple[str, int]] = self.address
        print("connected", peer, self.connected, self.send_queue_bytes)

    def OnRecv(self, data: iocpnet.RecvView) -> Optional[int]:
        if len(data) < 4:
            return 0                      # wait for more
        sent: bool = self.Send(data)
        if not sent:
            self.Disconnect("cannot echo")
        return None                       # all of it

    def OnSend(self, num_bytes: int) -> None:
        assert num_bytes > 0

    def OnDisconnected(self, reason: str) -> None:
        why: Optional[str] = self.disconnect_reason
        print("gone", reason, why)


class Viewer(iocpnet.Session):
    """What OnRecv's RecvView offers, typed as user code uses it."""

    kept: List[iocpnet.RecvView] = []

    def OnRecv(self, data: iocpnet.RecvView) -> Optional[int]:
        first: int = data[0]
        rest: bytes = data[1:]
        n: int = len(data) + data.nbytes + data.itemsize + data.ndim
        shape: Tuple[int] = data.shape
        mv: memoryview = memoryview(data)
        as_bytes: bytes = bytes(data) + data.tobytes()
        text: str = data.hex(":")
        ints: List[int] = data.tolist() + list(data)
        same: bool = data == b"abc" and data.obj is data and data.readonly
        wrong: bytes = data[0]  # type: ignore[assignment]
        with data:
            self.Send(data)
        print(first, rest, n, shape, mv.cast("B"), as_bytes, text, ints, same, wrong)
        return None


class Framed(iocpnet.Session):
    """A hook that always consumes everything may say so with -> None."""

    def OnRecv(self, buf: iocpnet.RecvView) -> None:
        self.Send(bytes(buf))


handler = PacketHandler()
PKT_HELLO = 1


class Game(iocpnet.PacketSession):
    handler = handler
    max_packet_size = 4096

    def __init__(self, world: Dict[str, int]) -> None:
        super().__init__()
        self.world = world

    def OnConnectFailed(self, reason: str) -> None:
        print("connect failed:", reason)


@handler.route(PKT_HELLO)
def on_hello(session: Game, payload: bytes) -> None:
    session.world["hello"] = session.world.get("hello", 0) + 1
    session.SendPacket(PKT_HELLO, payload)


def packets() -> None:
    pkt: bytes = iocpnet.make_packet(PKT_HELLO, b"hi")
    found, used, error = iocpnet.scan_packets(pkt + pkt[:3])
    for packet_id, payload in found:
        print(packet_id + 1, payload.decode())
    assert used == 2 * iocpnet.PACKET_HEADER_SIZE + 2 * len(b"hi") - 2
    if error is not None:
        print(error.upper())
    assert iocpnet.PACKET_SIZE_MAX == 65535
    iocpnet.make_packet("id", b"")  # type: ignore[arg-type]
    # RedisBackplane is served by a module __getattr__ (loaded when named) that type
    # checkers must not see: a misspelt name is still an error, the class still typed
    iocpnet.make_pakcet  # type: ignore[attr-defined]  # noqa: B018
    bp: type[iocpnet.RedisBackplane] = iocpnet.RedisBackplane
    assert bp.__name__ == "RedisBackplane"


def server() -> int:
    core = iocpnet.IocpCore(backend=None, recv_buffer_size=16384)
    backend: str = core.backend
    listener = iocpnet.Listener(("127.0.0.1", 0), backlog=128, reuse_port=False)
    service = iocpnet.Service(core, listener, Echo, 16, max_sessions=1000,
                              max_sessions_per_address=8, connect_rate_per_address=5.0,
                              connect_burst_per_address=10, address_table_size=4096)
    service.Start()
    port: int = service.listener.port
    assert port == listener.port and listener.accepts_posted >= 0
    print(backend, listener.address, listener.accepted, listener.accept_errors)

    def worker() -> None:
        while core.Dispatch(100) >= 0:
            pass

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()

    def tick(n: int, label: str) -> None:
        print(label, n)

    core.Post(tick, 1, "posted")
    timer: iocpnet.Timer = core.CallLater(0.5, tick, 2, "later")
    every = core.CallEvery(1.0, tick, 3, "every")
    core.Post(tick, "wrong", 1)  # type: ignore[arg-type]
    every.Cancel()
    print(timer.active, every.cancelled)

    sessions: List[iocpnet.Session] = service.sessions
    n: int = service.Broadcast(iocpnet.make_packet(PKT_HELLO), sessions=sessions)
    n += service.Broadcast(bytearray(b"raw"))
    service.Broadcast("text")  # type: ignore[arg-type]
    stats: Dict[str, int] = core.stats()
    counters: Dict[str, int] = iocpnet.debug_counters()
    print(n, stats["in_flight"], counters["sessions_alive"], service.session_count,
          service.total_sessions, service.rejected, service.idle_disconnects)
    figures = service.stats()
    live: int = figures["sessions"]["live"]
    refused: int = figures["refused"]["connect_rate_per_address"]
    on_recv: float = figures["hooks"]["OnRecv"]["seconds_max"] if figures["hooks"] else 0.0
    sizes: Dict[int, int] = figures["dispatch"]["batch_sizes"]
    print(live, refused, on_recv, sizes, figures["bytes_in"], figures["send_queue_bytes_max"])
    figures["sessions"]["idle"]  # type: ignore[typeddict-item]
    metrics = service.ServeMetrics(0, "127.0.0.1", name="game")
    metrics_port: int = metrics.port
    print(metrics_port)
    service.Stop(timeout=5.0)
    core.Close(5.0)
    for t in threads:
        t.join()
    return service.max_session_count


def original_shape() -> None:
    """main.cpp, as the README shows it."""
    service = iocpnet.Service(iocpnet.IocpCore(), iocpnet.Listener(11021), Echo, 100)
    service.Start()
    core: iocpnet.IocpCore = service.GetIocpCore()
    while core.Dispatch() >= 0:
        pass


def client() -> None:
    world: Dict[str, int] = {}
    core = iocpnet.IocpCore("epoll")
    policy = iocpnet.Reconnect(initial=0.1, max_delay=2.0, max_attempts=5)
    assert policy.delay(3) <= policy.max_delay
    clients = iocpnet.ClientService(core, ("127.0.0.1", 11021), lambda: Game(world), 10,
                                    reconnect=policy)
    clients.Start()
    extra: iocpnet.Session = clients.Connect()
    print(extra, clients.address, clients.count, clients.connect_failures,
          clients.reconnect, clients.listener)
    iocpnet.ClientService(core, 11021, Game, reconnect=True)  # type: ignore[arg-type]
    clients.Run(workers=2, shutdown_timeout=1.0)


def backends() -> None:
    available: List[str] = iocpnet.available_backends()
    for name in iocpnet.compiled_backends():
        reason: Optional[str] = iocpnet.backend_unavailable_reason(name)
        print(name, name in available, reason)
    try:
        iocpnet.IocpCore("kqueue")
    except iocpnet.BackendUnavailableError as e:
        print(e)
    version: str = iocpnet.__version__
    print(version)


def game_layer() -> None:
    """Groups, strands, Spawn, OnSendQueue, the run handle."""

    async def lookup(name: str) -> int:
        return len(name)

    class Room(iocpnet.Group):
        def Tick(self) -> None:
            self.Broadcast(b"state", exclude=None)

        def OnTaskDone(self, task: iocpnet.Task[int]) -> None:
            print(task.result())

    class Player(iocpnet.Session):
        def OnConnected(self) -> None:
            self.Spawn(lookup("ann"), self.on_login)
            self.Spawn(lookup("bob"))
            ok: bool = self.Post(self.step, 1)
            timer: iocpnet.Timer = self.CallEvery(0.05, self.step, 2)
            self.Post(self.step, "one")  # type: ignore[arg-type]
            print(ok, timer.active, self.groups, self.send_queue_high, self.send_queue_low)

        def on_login(self, task: iocpnet.Task[int]) -> None:
            level: int = task.result()
            print(level, task.done(), task.cancelled(), task.exception(), task.owner)

        def step(self, n: int) -> None:
            print(n)

        def OnSendQueue(self, high: bool) -> None:
            print(high)

    core = iocpnet.IocpCore()
    service = iocpnet.Service(core, iocpnet.Listener(0), Player, 10)
    room = Room(service, "lobby")
    room.CallEvery(0.05, room.Tick)
    with service.Start(workers=2) as run:
        port: Optional[int] = run.port
        for member in room:
            print(member in room, len(room), room.members, port)
        room.Post(room.Tick)
        room.Close()
    core.Spawn(lookup("x"), lambda t: print(t.result() + 1))
    core.Spawn(42)  # type: ignore[arg-type]
    bots = iocpnet.ClientService(core, 11021, lambda i: Player(), 3)
    bots.Start(workers=1).Stop()
    service.Run(workers=1, seconds=1.0)
