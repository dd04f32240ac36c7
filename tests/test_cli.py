"""The command line: ``dummy-client`` (echo and chat, and every kind of error it must
turn into a non-zero exit), ``demo``, ``echo`` and ``echo --processes N``."""
import os
import re
import signal
import socket

import pytest

import iocpnet
import iocpnet.__main__ as cli

from conftest import connect, recv_exactly, wait_for
from subproc import Proc, load_example


def iocpnet_cli(backend, *args):
    return Proc.python("-m", "iocpnet", "--backend", backend, *args)


def dummy_client(backend, port, *args):
    p = iocpnet_cli(backend, "dummy-client", "--port", port, *args)
    rc = p.wait(60)
    return rc, p.output


def summary_errors(out):
    m = re.search(r"^  errors +(\d+)$", out, re.M)
    assert m, out
    return int(m.group(1))


def round_trips(out):
    m = re.search(r"^  round trips +([\d,]+) checked", out, re.M)
    assert m, out
    return int(m.group(1).replace(",", ""))


class Echo(iocpnet.Session):
    def OnRecv(self, data):
        self.Send(data)


# ---- dummy-client: good runs ----

def test_dummy_client_against_an_echo_server(server, backend):
    srv = server(Echo, accepts=32)
    rc, out = dummy_client(backend, srv.port, "--clients", 20, "--seconds", 1.5,
                           "--interval", 0.5, "--size", 100)
    assert rc == 0, out
    assert summary_errors(out) == 0
    assert round_trips(out) > 0
    assert "20 connected, 0 failed to connect" in out
    # Not a terminal: one progress line per interval, with elapsed/total and figures.
    ticks = re.findall(r"^\[ *([\d.]+)/1.5 s\] sessions +(\d+) \| +[\d,]+ packets/s \| "
                       r"+[\d.]+ MB/s \| rtt p50 [\d.]+ ms p99 [\d.]+ ms \| errors 0$",
                       out, re.M)
    assert "\r" not in out
    # A line at each 0.5 s mark the run reached (0.5, 1.0, and 1.5 at the end): one to
    # three, in order, the first not before 0.5 s.  Not "at least two": a mark the
    # process slept through is skipped, not printed late (a loaded machine stalled the
    # whole client 1.4 s once: its only line came at 0.5 s, the next check was past
    # the end).
    # Each line belongs to the 0.5 s mark its stamp has passed: a line is never printed
    # before its mark, and no mark gets two lines (an order, not a speed: load can only
    # make marks skipped, which the bounds allow).
    marks = [int(float(t) / 0.5) for t, _ in ticks]
    assert marks and len(marks) <= 3, out
    assert marks[0] >= 1 and all(a < b for a, b in zip(marks, marks[1:])), out
    assert len(ticks) == len(re.findall(r"^\[", out, re.M)), out     # every line well-formed
    # Clients connected at each mark: all 20 by the end (the summary), not necessarily
    # by 0.5 s on a loaded machine (13 once).
    assert all(1 <= int(n) <= 20 for _, n in ticks), out
    wait_for(lambda: srv.service.session_count == 0, message="the load to leave")
    assert srv.service.total_sessions == 20


def test_dummy_client_against_the_chat_server(server, backend):
    state = load_example("chat_server").ChatServer(say_rate=0)
    srv = server(state.session_factory, accepts=32)
    rc, out = dummy_client(backend, srv.port, "--protocol", "chat", "--clients", 12,
                           "--room-size", 4, "--seconds", 1.5, "--interval", 0.5)
    assert rc == 0, out
    assert summary_errors(out) == 0
    trips = round_trips(out)
    assert trips > 0
    packets = int(re.search(r"^  packets +([\d,]+) received", out, re.M).group(1)
                  .replace(",", ""))
    # In rooms of 4, each client also hears the other three: about 4 packets a trip.
    assert packets >= 2 * trips
    wait_for(lambda: srv.service.session_count == 0, message="the load to leave")
    assert not state.rooms and not state.nicks       # everyone left cleanly
    del state


def test_demo_still_works(backend):
    p = iocpnet_cli(backend, "demo", "--clients", 10, "--seconds", 1)
    assert p.wait(60) == 0, p.output
    assert summary_errors(p.output) == 0
    assert round_trips(p.output) > 0


# ---- dummy-client: every error is a failure ----

def test_dummy_client_connection_refused(backend):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]               # nothing listens there
    rc, out = dummy_client(backend, port, "--clients", 3, "--seconds", 5)
    assert rc == 1, out
    assert summary_errors(out) == 3
    assert out.count("connect failed: connection refused") == 3
    assert "0 connected, 3 failed to connect" in out


def test_dummy_client_echo_mismatch(server, backend):
    class Corrupt(iocpnet.Session):
        """Echoes, but flips a byte of the 20th message of each session."""
        def OnConnected(self):
            self.n = 0

        def OnRecv(self, data):
            self.n += 1
            out = bytearray(data)
            if self.n == 20:
                out[-1] ^= 0xFF
            self.Send(bytes(out))

    srv = server(Corrupt)
    rc, out = dummy_client(backend, srv.port, "--clients", 2, "--seconds", 1,
                           "--size", 16)
    assert rc == 1, out
    assert "echo mismatch on message 20" in out
    assert summary_errors(out) >= 1


def test_dummy_client_unexpected_disconnect(server, backend):
    class Quitter(Echo):
        def OnConnected(self):
            self.n = 0

        def OnRecv(self, data):
            self.n += 1
            if self.n == 10:
                self.Disconnect("server had enough")
                return None
            self.Send(data)

    srv = server(Quitter)
    rc, out = dummy_client(backend, srv.port, "--clients", 2, "--seconds", 1,
                           "--size", 16)
    assert rc == 1, out
    assert out.count("disconnected during the load: peer closed the connection") == 2


def test_dummy_client_server_that_stops_answering(server, backend):
    class Mute(Echo):
        def OnConnected(self):
            self.n = 0

        def OnRecv(self, data):
            self.n += 1
            if self.n < 5:
                self.Send(data)

    srv = server(Mute)
    rc, out = dummy_client(backend, srv.port, "--clients", 2, "--seconds", 0.5,
                           "--size", 16, "--grace", 0.5)
    assert rc == 1, out
    assert out.count("no answer to its message 5 within 0.5 s of the end") == 2


def test_dummy_client_chat_over_max_size_is_refused(capsys):
    rc = cli.main(["dummy-client", "--protocol", "chat", "--size", "100000",
                   "--seconds", "1", "--clients", "1"])
    assert rc == 2
    assert "at most 8192 bytes" in capsys.readouterr().err


@pytest.mark.parametrize("argv, said", [
    (["dummy-client", "--clients", "0"], "--clients must be positive"),
    # NaN passed the check (nan <= 0 is false): `demo --seconds nan` ran forever.
    (["demo", "--seconds", "nan"], "--seconds must be positive"),
    (["dummy-client", "--interval", "nan"], "--interval must be positive"),
    (["dummy-client", "--grace", "nan"], "--grace must be positive"),
    (["echo", "--shutdown-timeout", "nan"], "--shutdown-timeout must be"),
])
def test_bad_arguments_are_refused(capsys, argv, said):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert said in capsys.readouterr().err


# ---- echo ----

def test_echo_command_stops_cleanly_on_sigterm(backend):
    with iocpnet_cli(backend, "echo", "--host", "127.0.0.1", "--port", 0) as p:
        port = p.port(r"echo server on 127\.0\.0\.1:(\d+)")
        with connect(("127.0.0.1", port)) as c:
            c.sendall(b"cli echo")
            assert recv_exactly(c, 8) == b"cli echo"
        p.signal(signal.SIGTERM)
        assert p.wait() == 0, p.output
        assert re.search(r"pid \d+: stopped after 1 sessions", p.output), p.output


@pytest.mark.parametrize("processes", [1, 2])
def test_echo_with_a_bad_certificate_fails_once_with_a_clear_error(backend, tmp_path,
                                                                   processes):
    """A --tls-cert that cannot be loaded: one clear line naming the file and exit 2.
    Under --processes N each child failed the same way and was restarted until "too
    many restarts in 10 s" (and the line said only "[SSL] PEM lib")."""
    if processes > 1 and not hasattr(socket, "SO_REUSEPORT"):
        pytest.skip("no SO_REUSEPORT here")
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    p = iocpnet_cli(backend, "echo", "--host", "127.0.0.1", "--port", 0,
                    "--processes", processes, "--tls-cert", str(bad), "--tls-key", str(bad))
    assert p.wait(60) == 2, p.output
    assert f"cannot load the TLS certificate {bad}" in p.output, p.output
    assert "restarted" not in p.output and "Traceback" not in p.output, p.output


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="no SO_REUSEPORT here")
def test_echo_processes_share_the_port(backend):
    """``echo --processes 2``: a child that dies is restarted; then both processes
    accept connections on the one port (each reports the sessions it served when
    stopped); on SIGINT the parent stops every child and exits 0."""
    with iocpnet_cli(backend, "echo", "--host", "127.0.0.1", "--port", 0,
                     "--processes", 2, "--workers", 1) as p:
        port = p.port(r"sharing 127\.0\.0\.1:(\d+)")
        ready = p.wait_for_line(r"echo server on 127\.0\.0\.1:\d+ .*pid (\d+)\)", count=2)
        pids = {int(m.group(1)) for m in ready}
        assert len(pids) == 2
        victim, survivor = sorted(pids)
        os.kill(victim, signal.SIGKILL)
        (m,) = p.wait_for_line(rf"process {victim} exited .* restarted as (\d+)")
        new_pid = int(m.group(1))
        p.wait_for_line(rf"echo server on .*pid {new_pid}\)")
        n = 64                     # the kernel spreads connections by their addresses
        for i in range(n):
            with connect(("127.0.0.1", port)) as c:
                c.sendall(b"conn %d" % i)
                assert recv_exactly(c, len(b"conn %d" % i)) == b"conn %d" % i
        p.signal(signal.SIGINT)
        assert p.wait() == 0, p.output
        out = p.output
    served = {int(pid): int(k) for pid, k in
              re.findall(r"pid (\d+): stopped after (\d+) sessions", out)}
    assert set(served) == {survivor, new_pid}, out
    assert sum(served.values()) == n, out
    assert min(served.values()) > 0, f"one process got no connection:\n{out}"
    assert "all 2 processes stopped" in out
    for pid in (survivor, new_pid):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
