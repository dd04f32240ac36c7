"""The C++ original's echo server (GameSession and main.cpp), one to one.

    python examples/echo_server.py              # port 11021, as in the original
    python -m iocpnet dummy-client --clients 100 --seconds 5      # load it

The original's main.cpp, and its iocpnet lines:

    ServiceRef service = make_shared<Service>(      service = iocpnet.Service(
        make_shared<IocpCore>(),                        iocpnet.IocpCore(),
        make_shared<Listener>(11021),                   iocpnet.Listener(11021),
        make_shared<GameSession>,                       GameSession,
        100);                                           100)
    service->Start();                               service.Start()
    for (int i = 0; i < 5; i++)                     for i in range(5):
        threads.emplace_back([=] {                      threading.Thread(target=worker)
            while (true)                            def worker():
                service->GetIocpCore()->Dispatch();     while core.Dispatch() >= 0: pass

One difference on purpose: Ctrl-C (or SIGTERM) stops it cleanly.  ``Dispatch``
returns -1 once the core is closed, so the workers end instead of looping forever.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType
from typing import List, Optional, Sequence

import iocpnet


# Hooks run on five worker threads at once: one lock keeps each printed line whole.
_print_lock = threading.Lock()


def say(line: str) -> None:
    with _print_lock:
        print(line, flush=True)


class GameSession(iocpnet.Session):
    """The original's GameSession: print the connection, echo what arrives."""

    def OnConnected(self) -> None:
        say(f"connected: {self.address}")

    def OnRecv(self, data: iocpnet.RecvView) -> Optional[int]:
        self.Send(data)         # echo (copied: the view is only valid during the call)
        return None             # all of it consumed

    def OnSend(self, num_bytes: int) -> None:
        pass                    # the original's OnSend: nothing to do for an echo

    def OnDisconnected(self, reason: str) -> None:
        say(f"disconnected: {self.address}: {reason}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=11021, help="0: any free port")
    args = p.parse_args(argv)

    # Ctrl-C and SIGTERM only set a flag, from the start: the main thread then stops
    # the service in order (a KeyboardInterrupt could hit it anywhere, even before
    # the workers are all running, and leave them running).
    stop = threading.Event()

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    service = iocpnet.Service(iocpnet.IocpCore(), iocpnet.Listener(args.port),
                              GameSession, 100)
    service.Start()
    core = service.GetIocpCore()

    def worker() -> None:
        while core.Dispatch() >= 0:
            pass

    threads: List[threading.Thread] = []
    for i in range(5):
        threads.append(threading.Thread(target=worker, name=f"worker-{i}"))
        threads[-1].start()
    say(f"echo server on port {service.listener.port} ({core.backend}); Ctrl-C to stop")

    # The main thread only waits for the signal; the workers do all the work.
    while not stop.wait(0.5):
        pass

    service.Stop()              # stop accepting, disconnect the sessions (flushing)
    core.Close()                # drain what is in flight; Dispatch returns -1
    for t in threads:
        t.join()
    say(f"stopped after {service.total_sessions} sessions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
