"""A server whose subscriber falls behind Redis (attack round, session 9): Redis drops
it, and the log must say so, not that Redis is unreachable."""
import logging
import os
import socket
import threading

from iocpnet.backplane import _HEADER
from iocpnet.resp import encode_command

from conftest import wait_for
from test_backplane import Node, sharing


def test_a_subscriber_redis_drops_for_falling_behind_is_not_called_unreachable(
        backend, redis_server, caplog):
    # Redis closes a subscriber whose unread output passes its client-output-buffer-
    # limit for pubsub (here 256 KiB), while the command connection stays up.  The
    # outage was logged as "<redis> is unreachable (peer closed the connection)": a user
    # looked for a network fault while Redis answered all along.
    caplog.set_level(logging.INFO, logger="iocpnet")
    r = redis_server("--client-output-buffer-limit", "pubsub 256kb 128kb 1")
    node = Node(backend, r.url(), workers=1)
    release = threading.Event()
    try:
        sharing(node)
        node.core.Post(release.wait, 20)        # the only worker: nobody reads
        message = encode_command("PUBLISH", node.bp._channel("room"),
                                 _HEADER.pack(1, 0, os.urandom(8), 1) + bytes(65536))
        with socket.create_connection(("127.0.0.1", r.port), timeout=10) as c:
            c.sendall(message * 128)            # 8 MiB for the subscriber
            answers = b""
            while answers.count(b"\r\n") < 128:
                answers += c.recv(65536)
        release.set()
        wait_for(lambda: node.bp.stats()["outages"] == 1, 10, "the outage")
        sharing(node, timeout=10)
        # The state turns UP before the "sharing again" line is logged (both under the
        # backplane's lock, on a worker): a test thread that sees sharing can be ahead
        # of the record.
        wait_for(lambda: [r for r in caplog.records if "sharing again" in r.getMessage()],
                 10, "the 'sharing again' line")
        lines = [rec.getMessage() for rec in caplog.records]
        assert not [ln for ln in lines if "unreachable" in ln], lines
        lost = [ln for ln in lines if "lost the subscriber connection" in ln]
        assert len(lost) == 1 and "client-output-buffer-limit" in lost[0], lines
        assert [ln for ln in lines if "sharing again" in ln], lines
    finally:
        release.set()
        node.stop()
