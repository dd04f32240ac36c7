"""The floor under every Python library: a Python OnRecv per receive completion, its
reply sent at once, and nothing else (servers/py_floor.c, built into benchmarks/build/).
Measured only when named (run.py --only '...,py-floor'): issue 14's pipelined target."""
import os
import signal
import sys

from _common import parse_args

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "build"))


def main():
    args = parse_args(__doc__, lambda p: p.add_argument(
        "--ring-send", action="store_true",
        help="the variant that queues each reply on the ring, sent after the batch"))
    if args.ring_send:
        import _py_floor_ring as _py_floor
    else:
        import _py_floor

    class EchoSession(_py_floor.Session):
        def OnRecv(self, data):
            self.Send(data)

    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    print("READY", flush=True)
    _py_floor.serve(args.port, EchoSession)


if __name__ == "__main__":
    main()
