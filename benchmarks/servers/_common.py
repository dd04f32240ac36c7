"""Shared bits of the Python echo servers: argument parsing, descriptor limits and the
backlog.  The asyncio echo Protocol and its server loop, which asyncio, uvloop and
aiofastnet run alike, are in _asyncio_echo.py: importing asyncio costs a process about
2 MiB of resident memory, which would count in the peak RSS of the servers that do not
use it (iocpnet's).

Kept tiny on purpose: every server file should read as the idiomatic way to
write an echo server with its library, nothing more.
"""
import argparse
import resource


def parse_args(description, extra=None):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("port", type=int, help="listen on 127.0.0.1:PORT")
    if extra:
        extra(p)
    args = p.parse_args()
    # The idle benchmark holds 10,000 connections; the soft limit may be lower
    # than that on other machines, and raising it is what a real server would do.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return args


# Same backlog as the C servers, so no server is slower to accept a burst
# merely because of a smaller accept queue.
BACKLOG = 1024
