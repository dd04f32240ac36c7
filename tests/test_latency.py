"""Replies are not held back by the rest of a batch.

A hook's Send must reach the peer before the next hook of the same batch runs (which may
block), and a loop that polls ``Dispatch(0)`` once per frame must read a message and send
its reply in the same call.  Both hold with and without an ``OnSend`` hook (with one, a
send completes through the port instead of leaving inline).
"""
import socket
import threading
import time

import pytest

import iocpnet

from conftest import Recorder, connect, recv_exactly, wait_for


SLOW = 0.3          # how long the slow hook blocks


def _session_class(rec, gate, with_on_send):
    class Hooked(iocpnet.Session):
        def OnRecv(self, data):
            msg = bytes(data)
            if msg == b"gate":
                # Holds the only worker until the test has sent both messages, so that
                # they complete into one batch, the fast one first.
                rec.add("gate", msg, time.monotonic())
                gate.wait(5)
                return None
            rec.add("hook", msg, time.monotonic())
            self.Send(msg)
            if msg == b"slow":
                time.sleep(SLOW)
                rec.add("slow done", msg, time.monotonic())
            return None

        def OnDisconnected(self, reason):
            rec.on_disconnected(self, reason)

    if with_on_send:
        class WithOnSend(Hooked):
            def OnSend(self, num_bytes):
                rec.add("sent", num_bytes, time.monotonic())
        return WithOnSend
    return Hooked


@pytest.mark.parametrize("with_on_send", [False, True], ids=["inline", "on_send"])
def test_reply_not_held_back_by_a_slow_hook_later_in_the_batch(server, with_on_send):
    """One worker; the fast session's message and the slow session's message complete
    into one batch, fast first.  The fast client has its reply before the slow hook
    (which blocks 300 ms) returns."""
    for attempt in range(5):
        rec = Recorder()
        gate = threading.Event()
        srv = server(_session_class(rec, gate, with_on_send), workers=1)
        g, fast, slow = connect(srv.address), connect(srv.address), connect(srv.address)
        got = {}

        def read_fast():
            try:
                got["data"] = recv_exactly(fast, 4)
                got["at"] = time.monotonic()
            except OSError as e:
                got["error"] = e

        reader = threading.Thread(target=read_fast)
        reader.start()
        try:
            g.sendall(b"gate")
            wait_for(lambda: any(e[0] == "gate" for e in rec.events), 5,
                     "the worker inside the gate hook")
            fast.sendall(b"fast")
            time.sleep(0.02)                 # fast first (an attempt out of order is retried)
            slow.sendall(b"slow")
            time.sleep(0.05)                 # both arrived while the worker is held
            gate.set()
            assert recv_exactly(slow, 4) == b"slow"
            reader.join(5)
            wait_for(lambda: any(e[0] == "slow done" for e in rec.events), 5,
                     "the slow hook to return")
            assert got.get("data") == b"fast", got
            with rec.lock:
                hooks = [e for e in rec.events if e[0] == "hook"]
                slow_done = [e[2] for e in rec.events if e[0] == "slow done"]
            order = [e[1] for e in hooks]
        finally:
            gate.set()
            for s in (g, fast, slow):
                s.close()
            reader.join(5)
            srv.stop()
        if order != [b"fast", b"slow"]:
            continue        # the messages did not share a batch in that order: again
        assert slow_done, rec.events
        assert got["at"] < slow_done[0], (
            f"the fast reply arrived {got['at'] - slow_done[0] + SLOW:.3f} s after its "
            f"hook's batch reached the slow hook, which blocks {SLOW} s")
        return
    pytest.fail(f"the two messages never completed in one batch, fast first: {order}")


@pytest.mark.parametrize("with_on_send", [False, True], ids=["inline", "on_send"])
def test_read_and_reply_in_one_dispatch_poll(backend, with_on_send):
    """A game loop polling Dispatch(0) once per frame: the frame whose Dispatch(0) runs
    OnRecv has sent the reply when Dispatch returns, without another call."""
    rec = Recorder()
    cls = _session_class(rec, threading.Event(), with_on_send)
    core = iocpnet.IocpCore(backend)
    listener = iocpnet.Listener(("127.0.0.1", 0))
    service = iocpnet.Service(core, listener, cls, 4)
    service.Start()
    c = None
    try:
        c = connect(("127.0.0.1", listener.port))

        def frames_until(pred, what):
            deadline = time.monotonic() + 10
            while not pred():
                assert time.monotonic() < deadline, f"no {what} after 10 s of frames"
                core.Dispatch(0)
                if not pred():
                    time.sleep(0.005)    # the rest of the frame

        frames_until(lambda: len(service.sessions) == 1, "session")
        for i in range(20):
            msg = b"m%03d" % i
            c.sendall(msg)
            frames_until(lambda: any(e[0] == "hook" and e[1] == msg for e in rec.events),
                         "OnRecv")
            # No Dispatch from here on: the reply must already be on its way.
            c.settimeout(2)
            try:
                assert recv_exactly(c, 4) == msg
            except socket.timeout:
                pytest.fail(f"message {i}: the reply waited for the next Dispatch(0)")
    finally:
        if c is not None:
            c.close()
        service.Stop(5)
        deadline = time.monotonic() + 5
        while core.stats().get("in_flight", 0) > 0 and time.monotonic() < deadline:
            core.Dispatch(10)
        core.Close(5)
    wait_for(lambda: rec.disconnected, 5, "OnDisconnected")
