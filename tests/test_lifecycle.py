"""A service's life: Start (and a session factory that fails on its first call), and
Start after Stop."""
import pytest

import iocpnet


class Echo(iocpnet.Session):
    def OnRecv(self, data):
        self.Send(data)


# ---- Start ----

def test_start_raises_the_factorys_own_exception_and_does_not_listen(backend):
    """Start() makes one session before it listens: a factory that cannot make one
    fails Start with its own exception (or a TypeError naming what it returned), and
    nothing was bound; once the factory works, Start succeeds."""

    class PoolExhausted(Exception):
        pass

    broken = [True]

    def factory():
        if broken[0]:
            raise PoolExhausted("no session objects left")
        return Echo()

    core = iocpnet.IocpCore(backend)
    try:
        listener = iocpnet.Listener(("127.0.0.1", 0))
        service = iocpnet.Service(core, listener, factory, 4)
        with pytest.raises(PoolExhausted, match="no session objects left"):
            service.Start()
        assert listener.port == 0 and listener.accepts_posted == 0
        broken[0] = False
        service.Start()
        assert listener.port != 0 and listener.accepts_posted == 4
        service.Stop(5)

        other = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), lambda: "nope", 4)
        with pytest.raises(TypeError, match="the session factory returned str, not a "
                                            "Session"):
            other.Start()
    finally:
        core.Close(5)


def test_start_after_stop_says_a_stopped_service_cannot_start(backend):
    core = iocpnet.IocpCore(backend)
    try:
        service = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), Echo, 4)
        service.Start()
        with pytest.raises(RuntimeError, match="already started"):
            service.Start()
        service.Stop(5)
        for start in (service.Start, lambda: service.Run(workers=1)):
            with pytest.raises(RuntimeError, match="a stopped service cannot start "
                                                   "again"):
                start()
        clients = iocpnet.ClientService(core, ("127.0.0.1", 9), Echo, 0)
        clients.Start()
        clients.Stop(5)
        with pytest.raises(RuntimeError, match="a stopped service cannot start again"):
            clients.Start()
    finally:
        core.Close(5)
