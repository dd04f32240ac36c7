"""What the benchmark scripts share: a process's CPU time, a free port, waiting for a
server to listen or echo, and the broadcast-room server of group_broadcast.py and
redis_fanout.py (one definition, so the two measure the same server).

Each script runs as `python3 benchmarks/NAME.py`, so this directory is on sys.path and
`import _common` finds this file (benchmarks/websocket/run.py adds it first).
"""
import os
import socket
import time
from typing import Any, Optional

CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process pid, all its threads (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces and parentheses: split after the last ")".
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    """Until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {port} after {timeout} s") from None
            time.sleep(0.05)


def wait_echo(port: int, timeout: float = 20.0, probe: bytes = b"ping") -> None:
    """Until the server on 127.0.0.1:port echoes probe (listening is not enough: some
    servers say they are ready before their first accept is armed)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(probe)
                got = b""
                while len(got) < len(probe):
                    chunk = s.recv(len(probe) - len(got))
                    if not chunk:
                        break
                    got += chunk
                if got == probe:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server on {port} does not echo after {timeout} s")
        time.sleep(0.05)


MSG = 64   # the broadcast benchmarks' message size


def serve_room(port: int, backend: Optional[str], redis: Optional[str] = None) -> None:
    """The broadcast server: a connection's first byte says its role ("M": a member of
    the one room; anything else: a sender), answered by "!"; then every MSG-byte message
    a sender sends is broadcast to the room. With redis, the room is shared through a
    RedisBackplane. Prints "ready" and runs until terminated."""
    import iocpnet

    core = iocpnet.IocpCore(backend)
    bp = iocpnet.RedisBackplane(core, redis) if redis else None
    room = iocpnet.Group(core, "room", backplane=bp)

    class Conn(iocpnet.Session):
        role = b""

        def OnRecv(self, data: Any) -> int:
            if not self.role:
                self.role = bytes(data[:1])
                if self.role == b"M":
                    room.Add(self)
                self.Send(b"!")
                return 1
            n = len(data) - len(data) % MSG
            for off in range(0, n, MSG):
                room.Broadcast(bytes(data[off:off + MSG]))
            return n

    service = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", port)), Conn, 256)
    run = service.Start(workers=1)       # one worker: the server has one core
    if bp is not None:
        bp.Start()
        deadline = time.monotonic() + 10
        while not bp.sharing:
            if time.monotonic() > deadline:
                raise SystemExit("not sharing through redis after 10 s")
            time.sleep(0.01)
    print("ready", flush=True)
    try:
        while True:
            time.sleep(3600)             # until the driver terminates us
    finally:
        run.Stop()
