"""Packaging: one version everywhere, and the package carries its types.

The version has one source, ``__version__`` in ``iocpnet/__init__.py``; the wheel's
metadata reads it at build time (pyproject.toml, [tool.setuptools.dynamic]).  The stub
of the extension, ``_core.pyi``, is written by hand: the last test catches a public
name added to ``_core.pyx`` and forgotten there (scripts/check_types.sh then checks the
signatures with stubtest).
"""
import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import types

import pytest

import iocpnet
import iocpnet._core as core

HERE = os.path.dirname(os.path.abspath(iocpnet.__file__))


def installed_distribution():
    """The distribution iocpnet was imported from, or None (a build on PYTHONPATH)."""
    try:
        dist = importlib.metadata.distribution("iocpnet")
    except importlib.metadata.PackageNotFoundError:
        return None
    init = os.path.realpath(iocpnet.__file__)
    for f in dist.files or ():
        if str(f).replace("\\", "/") == "iocpnet/__init__.py" and \
                os.path.realpath(str(dist.locate_file(f))) == init:
            return dist
    return None       # metadata of another copy (say, an older install beside a dev build)


def test_version_is_a_release_number():
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?(a|b|rc|dev|post)\d*)*", iocpnet.__version__)


def test_metadata_version_is_the_package_version():
    dist = installed_distribution()
    if dist is None:
        # CI tests the installed wheel (scripts/test.sh): there it must be found.
        assert not os.environ.get("CI"), \
            f"CI must test an installed iocpnet, but {iocpnet.__file__} has no metadata"
        pytest.skip("iocpnet is not imported from an installed distribution")
    assert dist.version == iocpnet.__version__


def test_command_line_version(tmp_path):
    out = subprocess.run([sys.executable, "-m", "iocpnet", "--version"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == f"iocpnet {iocpnet.__version__}"


def test_types_ship_with_the_package():
    assert os.path.isfile(os.path.join(HERE, "py.typed"))
    assert os.path.isfile(os.path.join(HERE, "_core.pyi"))


def _stub_names():
    """Top-level names of _core.pyi, and the names declared in each class body."""
    with open(os.path.join(HERE, "_core.pyi"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    top, members = set(), {}

    def names_of(body):
        out = set()
        for node in body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                out.add(node.name)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                out.add(node.target.id)
            elif isinstance(node, ast.Assign):
                out.update(t.id for t in node.targets if isinstance(t, ast.Name))
            elif isinstance(node, ast.ImportFrom):
                # `from iocpnet.run import RunHandle as RunHandle`: an explicit
                # re-export (PEP 484), declared where it is defined.
                out.update(a.name for a in node.names if a.asname == a.name)
        return out

    top = names_of(tree.body)
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            members[node.name] = names_of(node.body)
    return top, members


def test_stub_declares_every_public_name_of_the_extension():
    top, members = _stub_names()
    public = {name for name, value in vars(core).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert public - top == set(), "public names of iocpnet._core missing from _core.pyi"
    for name in sorted(public):
        cls = getattr(core, name)
        if not isinstance(cls, type) or cls.__module__ != core.__name__:
            continue
        if cls.__name__ != name:
            continue      # an alias (ServerService is Service): checked under its name
        # What the class itself defines (methods, properties, readonly attributes);
        # inherited names are checked on the base.
        own = {n for n in vars(cls) if not n.startswith("_")}
        missing = own - members.get(name, set())
        assert not missing, f"{name}: {sorted(missing)} missing from _core.pyi"


# What a plain TCP server must not load: OpenSSL (ssl, hashlib: libcrypto's pages and
# its start-up, ~5 MiB resident) and inspect (ast, dis, tokenize: ~0.7 MiB). They belong
# to TLS, WebSocket handshakes, RedisBackplane and the checks of unusual hooks, which
# load them when used. Issue 14's peak-RSS cell is a plain echo server like this one.
_PLAIN_SERVER = r"""
import socket, sys, threading
import iocpnet

class Echo(iocpnet.Session):
    def OnConnected(self):
        pass
    def OnRecv(self, data):
        self.Send(data)
    def OnDisconnected(self, reason):
        pass

core = iocpnet.IocpCore(sys.argv[1])
listener = iocpnet.Listener(("127.0.0.1", 0))
service = iocpnet.Service(core, listener, Echo, 4)
service.Start()
def work():
    while core.Dispatch() >= 0:
        pass
t = threading.Thread(target=work)
t.start()
with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as c:
    c.sendall(b"ping")
    got = b""
    while len(got) < 4:
        got += c.recv(4)
assert got == b"ping", got
service.Stop(5)
core.Close(5)
t.join(5)
print(" ".join(sorted(m for m in ("ssl", "_ssl", "hashlib", "_hashlib", "inspect")
                      if m in sys.modules)))
"""


def test_a_plain_server_loads_no_openssl_and_no_inspect(backend):
    r = subprocess.run([sys.executable, "-c", _PLAIN_SERVER, backend], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "", f"loaded by import, Start and one echo: {r.stdout.strip()}"


def test_redis_backplane_is_still_a_name_of_the_package():
    from iocpnet import RedisBackplane
    from iocpnet.backplane import RedisBackplane as the_class
    assert RedisBackplane is the_class is iocpnet.RedisBackplane
    assert "RedisBackplane" in dir(iocpnet)
    with pytest.raises(AttributeError, match="no_such_name"):
        iocpnet.no_such_name  # noqa: B018
