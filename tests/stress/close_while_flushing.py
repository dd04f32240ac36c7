"""Close() while a session is still flushing to a peer that does not read, for
tests/test_resources.py.

    python tests/stress/close_while_flushing.py --backend epoll

A session queues 32 MiB (send_queue_limit 64 MiB, flush_timeout 2 s) to a peer that
never reads.  ``service.Stop(1.0)`` gives up before the flush deadline, then
``core.Close(5.0)`` runs: the session should be closed when its flush_timeout expires
(README: "queued data not flushed in time ... closed anyway"), get its one
OnDisconnected, and Close should return with nothing in flight.  Prints one JSON line;
exit status 0 when that holds.  (In a subprocess: when it does not hold, the session and
the core are leaked, which must not spill into the test process's leak checks.)
"""
import argparse
import gc
import json
import socket
import sys
import threading
import time

import iocpnet


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default=None)
    args = ap.parse_args()
    reasons = []

    class Pusher(iocpnet.Session):
        flush_timeout = 2.0
        send_queue_limit = 64 << 20

        def OnConnected(self):
            self.Send(b"p" * (32 << 20))    # far more than the socket buffers hold

        def OnDisconnected(self, reason):
            reasons.append(reason)

    core = iocpnet.IocpCore(args.backend)
    service = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), Pusher, 4)
    service.Start()

    def worker():
        while core.Dispatch() >= 0:
            pass

    workers = [threading.Thread(target=worker) for _ in range(2)]
    for w in workers:
        w.start()
    peer = socket.socket()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer.connect(("127.0.0.1", service.listener.port))        # and never read
    time.sleep(0.3)
    t0 = time.monotonic()
    service.Stop(1.0)
    core.Close(5.0)
    took = time.monotonic() - t0
    for w in workers:
        w.join(10)
    stats = core.stats()
    peer.close()
    del service, core, Pusher
    gc.collect()
    result = {"close_seconds": round(took, 2), "reasons": reasons,
              "in_flight": stats["in_flight"], "debug_counters": iocpnet.debug_counters(),
              "workers_alive": sum(w.is_alive() for w in workers)}
    print(json.dumps(result), flush=True)
    ok = (len(reasons) == 1 and stats["in_flight"] == 0 and result["workers_alive"] == 0
          and not any(result["debug_counters"].values()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
