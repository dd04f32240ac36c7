"""The first thing a reader should see: the original's echo server, in iocpnet."""
import iocpnet

from conftest import connect, recv_exactly


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
