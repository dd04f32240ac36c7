"""An echo server whose descriptor limit (RLIMIT_NOFILE) leaves room for only a few
connections, for tests/test_resources.py's accept-starvation test.

    python tests/stress/fd_limited_server.py --backend epoll --headroom 10

The soft RLIMIT_NOFILE is set to the descriptors the server needs (measured with a probe
core and listener) plus --headroom, so accepts past that many fail with EMFILE.  Prints one JSON line
{"port": ..., "pid": ..., "limit": ...}, logs (logger iocpnet) to stderr, and stops
gracefully when standard input says "stop" (or closes), printing the Listener's counters
as a last JSON line.  Exit status 0 when it stopped cleanly.
"""
import argparse
import json
import logging
import os
import resource
import sys
import threading

import iocpnet


class Echo(iocpnet.Session):
    def OnRecv(self, data):
        self.Send(data)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default=None)
    ap.add_argument("--headroom", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def open_fds():
        return len(os.listdir("/proc/self/fd")) - 1     # less listdir's own descriptor

    # Measure what a core and a listener take, then lower the limit *before* making the
    # real ones: io_uring accepts posted before the limit was lowered could still
    # complete over it (the kernel checks the limit as it stood when they were armed),
    # and a server's limit is normally set before it starts anyway.
    before = open_fds()
    probe = iocpnet.IocpCore(args.backend)
    probe_service = iocpnet.Service(probe, iocpnet.Listener(("127.0.0.1", 0)), Echo, 16)
    probe_service.Start()
    used = open_fds() - before
    probe_service.Stop()
    probe.Close()
    del probe_service, probe
    limit = before + used + args.headroom
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))

    core = iocpnet.IocpCore(args.backend)
    service = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), Echo, 16)
    service.Start()

    def worker():
        while core.Dispatch() >= 0:
            pass

    workers = [threading.Thread(target=worker) for _ in range(args.workers)]
    for w in workers:
        w.start()
    open_now = open_fds()
    print(json.dumps({"port": service.listener.port, "pid": os.getpid(), "limit": limit,
                      "open": open_now, "backend": core.backend}), flush=True)

    for line in sys.stdin:
        if line.strip() == "stop":
            break
    # Room again for whatever shutting down needs.
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listener = service.listener
    service.Stop()
    core.Close()
    for w in workers:
        w.join(10)
    alive = sum(w.is_alive() for w in workers)
    print(json.dumps({"accepted": listener.accepted, "accept_errors": listener.accept_errors,
                      "in_flight": core.stats()["in_flight"], "workers_alive": alive}),
          flush=True)
    return 0 if alive == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
