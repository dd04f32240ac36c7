"""The first thing a reader should see: the original's echo server, in iocpnet."""
import os
import socket

import pytest

import iocpnet

from conftest import connect, recv_exactly, recv_until_eof


class GameSession(iocpnet.Session):
    def OnRecv(self, data):
        self.Send(data)          # echo what came in; None = all of it consumed


def test_echo_round_trip(server):
    srv = server(GameSession)
    with connect(srv.address) as c:
        c.sendall(b"hello, iocpnet")
        assert recv_exactly(c, 14) == b"hello, iocpnet"


def test_original_main_cpp_shape(backend):
    """Service(IocpCore(), Listener(port), GameSession, 100); Start(); 5 threads each
    looping `Dispatch() >= 0`, as the C++ original's main.cpp does."""
    import threading
    service = iocpnet.Service(iocpnet.IocpCore(backend), iocpnet.Listener(("127.0.0.1", 0)),
                              GameSession, 100)
    service.Start()

    def worker():
        while service.GetIocpCore().Dispatch() >= 0:
            pass

    threads = [threading.Thread(target=worker) for _ in range(5)]
    for t in threads:
        t.start()
    try:
        with connect(("127.0.0.1", service.listener.port)) as c:
            c.sendall(b"ping")
            assert recv_exactly(c, 4) == b"ping"
        assert service.listener.accepts_posted == 100
    finally:
        service.Stop()
        service.GetIocpCore().Close()
        for t in threads:
            t.join(10)
    assert not any(t.is_alive() for t in threads)


@pytest.mark.parametrize("workers", [1, 2])
def test_messages_that_fill_the_receive_buffer_exactly(server, workers):
    """A read that fills its receive buffer cannot see whether more is queued (the epoll
    backend then asks the kernel how much is left, TCP_INQ, instead of reading again):
    messages of exactly the buffer size, one at a time and several back to back, all
    come back byte-exact, and an end of stream right after a full buffer is seen."""
    size = 4096
    srv = server(GameSession, workers=workers, core_kw={"recv_buffer_size": size})
    with connect(srv.address) as c:
        for i in range(20):
            msg = bytes([i]) * size
            c.sendall(msg)
            assert recv_exactly(c, size) == msg
        for k in (2, 3, 8):
            msg = os.urandom(k * size)
            c.sendall(msg)
            assert recv_exactly(c, len(msg)) == msg
        msg = os.urandom(size)
        c.sendall(msg)
        c.shutdown(socket.SHUT_WR)
        assert recv_until_eof(c) == msg
