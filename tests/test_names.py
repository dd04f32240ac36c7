"""Names that explain themselves, and the old spellings kept as aliases for one release
(docs/guide.md, "Naming rules"): what a user who wrote either one gets."""
import warnings

import pytest

import iocpnet
from conftest import connect, recv_exactly


class Echo(iocpnet.Session):
    def OnRecv(self, data):
        self.Send(data)


def _echo_once(service):
    with connect(("127.0.0.1", service.listener.port)) as c:
        c.sendall(b"hi")
        assert recv_exactly(c, 2) == b"hi"


@pytest.mark.parametrize("spelling", ["positional", "accepts"])
def test_accepts_kept_posted(backend, spelling):
    """Service(core, listener, factory, 3) as the original's main.cpp writes it, and
    accepts=3: three accepts posted, re-posted after each one (not a cap: a fourth
    client still gets in), no warning."""
    core = iocpnet.IocpCore(backend)
    listener = iocpnet.Listener(("127.0.0.1", 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if spelling == "positional":
            service = iocpnet.Service(core, listener, Echo, 3)
        else:
            service = iocpnet.Service(core, listener, Echo, accepts=3)
    assert service.accepts == 3 and service.max_session_count == 3
    handle = service.Start(workers=1)
    try:
        assert listener.accepts_posted == 3
        clients = [connect(("127.0.0.1", listener.port)) for _ in range(4)]
        for c in clients:
            c.sendall(b"x")
            assert recv_exactly(c, 1) == b"x"
        for c in clients:
            c.close()
    finally:
        handle.Stop()
        core.Close()


def test_max_session_count_keyword_is_an_alias_that_warns(backend):
    core = iocpnet.IocpCore(backend)
    try:
        with pytest.warns(DeprecationWarning, match="accepts="):
            service = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), Echo,
                                      max_session_count=2)
        assert service.accepts == 2
        with pytest.raises(TypeError, match="not both"):
            iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), Echo, 2,
                            max_session_count=2)
        with pytest.raises(ValueError, match="accepts"):
            iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), Echo, accepts=0)
        # Not started: nothing to stop.
    finally:
        core.Close()


def test_server_service_is_service(backend):
    """ServerService is an alias (same class), and it serves as Service does."""
    assert iocpnet.ServerService is iocpnet.Service
    core = iocpnet.IocpCore(backend)
    service = iocpnet.ServerService(core, iocpnet.Listener(("127.0.0.1", 0)), Echo,
                                    accepts=2)
    handle = service.Start(workers=1)
    try:
        assert type(service) is iocpnet.Service
        _echo_once(service)
    finally:
        handle.Stop()
        core.Close()
