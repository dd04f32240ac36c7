"""A server under ``service.Run()`` whose OnRecv is slow on purpose, for
tests/test_lifecycle.py: what SIGINT/SIGTERM, and a second one, do to a hook that is
running when they arrive.

    python tests/stress/run_until_signal.py --backend epoll --hook-seconds 1 \
        --shutdown-timeout 5 --reply-bytes 262144

Each message a client sends makes OnRecv print ``in OnRecv <client port>``, sleep
``--hook-seconds``, then Send ``--reply-bytes`` bytes (bytes ``i & 0xFF``) and print
whether Send took them.  Prints ``listening on 127.0.0.1:<port>`` when ready and,
after Run returns, ``Run returned at <time.monotonic()>`` (the clock is the system's
monotonic clock, which the test reads too).  Logging goes to stderr at INFO.
"""
import argparse
import logging
import sys
import time

import iocpnet


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default=None)
    ap.add_argument("--hook-seconds", type=float, default=1.0)
    ap.add_argument("--shutdown-timeout", type=float, default=5.0)
    ap.add_argument("--reply-bytes", type=int, default=1 << 18)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    reply = bytes(i & 0xFF for i in range(args.reply_bytes))

    class Slow(iocpnet.Session):
        def OnRecv(self, data):
            print(f"in OnRecv {self.address[1]}", flush=True)
            time.sleep(args.hook_seconds)
            print(f"reply queued {self.Send(reply)}", flush=True)

        def OnDisconnected(self, reason):
            print(f"disconnected {self.address[1]}: {reason}", flush=True)

    core = iocpnet.IocpCore(args.backend)
    listener = iocpnet.Listener(("127.0.0.1", 0))
    service = iocpnet.Service(core, listener, Slow, 8)
    service.Start()
    print(f"listening on 127.0.0.1:{listener.port}", flush=True)
    service.Run(workers=args.workers, shutdown_timeout=args.shutdown_timeout)
    print(f"Run returned at {time.monotonic():.6f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
