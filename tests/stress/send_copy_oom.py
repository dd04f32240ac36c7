"""A Send whose unsent rest cannot be copied (out of memory), for tests/test_resources.py.

    python tests/stress/send_copy_oom.py --backend epoll

A session's peer never reads. Send(2 GiB of anonymous mmap: its pages are never made,
reading them maps the zero page) hands what the socket takes to it at once; the rest of
a buffer that is not ``bytes`` must be copied to be queued, and with the address space
capped (RLIMIT_AS, set after everything else is allocated; 2 GiB is beyond what an
allocator keeps reserved, mimalloc's arenas on 3.13t included) that copy fails. What
must hold: Send raises MemoryError, the session is not left locked (a Disconnect from
another thread returns), and it ends with a reason that says why (part of the message
went, so the stream is broken). Prints a JSON line after the Send and another once the
session has ended. (In a subprocess: the address-space cap and a session locked for
ever, if it comes to that, must not reach the test process.)
"""
import argparse
import json
import mmap
import os
import resource
import socket
import threading
import time

import iocpnet

SIZE = 2 << 30


def vm_size():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default=None)
    args = ap.parse_args()
    result = {}
    sessions = []
    ended = threading.Event()

    class Quiet(iocpnet.Session):
        def OnConnected(self):
            sessions.append(self)

        def OnDisconnected(self, reason):
            result["reason"] = reason
            ended.set()

    core = iocpnet.IocpCore(args.backend)
    service = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), Quiet, 4)
    service.Start()

    def worker():
        while core.Dispatch() >= 0:
            pass

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(2)]
    for w in workers:
        w.start()
    peer = socket.socket()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer.connect(("127.0.0.1", service.listener.port))          # and never read
    deadline = time.monotonic() + 10
    while not sessions and time.monotonic() < deadline:
        time.sleep(0.01)
    session = sessions[0]
    data = mmap.mmap(-1, SIZE)       # not bytes: what the socket does not take is copied
    # The threads the checks below use exist before the cap (their stacks are mapped).
    disconnect_done = threading.Event()
    go = threading.Event()

    def disconnect():
        go.wait()
        session.Disconnect("the test's Disconnect")
        disconnect_done.set()

    t = threading.Thread(target=disconnect, daemon=True)
    t.start()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    # Room for everything but a copy of most of `data`.
    resource.setrlimit(resource.RLIMIT_AS, (vm_size() + SIZE // 2, hard))
    try:
        result["send"] = repr(session.Send(data))
    except MemoryError as e:
        result["send"] = f"MemoryError: {e}"
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    # A first line now: a Disconnect spinning on a lock left held keeps the GIL, and
    # nothing after it runs.
    print(json.dumps(result), flush=True)
    go.set()
    result["disconnect_returned"] = disconnect_done.wait(5)
    result["ended"] = ended.wait(5)
    # Whether the session may be sent to again (it must not hang either).
    if result["disconnect_returned"]:
        result["send_after"] = repr(session.Send(b"x"))
    print(json.dumps(result), flush=True)
    if not result["disconnect_returned"]:
        os._exit(3)               # a worker may spin on the lock for ever: no Stop
    peer.close()
    service.Stop(2.0)
    core.Close(2.0)
    for w in workers:
        w.join(5)


if __name__ == "__main__":
    main()
