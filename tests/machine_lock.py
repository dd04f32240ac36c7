"""The machine-wide guard between the tests that switch io_uring off in the kernel
(marked machine_state) and every other test, in any process on this machine: xdist
workers, another CI run, another person's pytest.

Every test holds LOCK shared for its whole run (setup to teardown: conftest's
pytest_runtest_protocol); a machine_state test takes it exclusive before it touches the
sysctl.  flock has no writer preference: with two or more processes running tests back to
back the shared lock might never be free at any one moment.  So the exclusive side first
takes TURNSTILE exclusive, and the shared side passes through it (takes and drops it
shared) before it takes LOCK: once a machine_state test waits, new tests wait behind it,
the running ones end, and it gets the lock.

flock locks belong to an open file: each acquisition opens its own, and closing it (also
by the process dying) releases it.  Only the standard library: a subprocess imports this
file alone."""
import contextlib
import fcntl
import os
import time

# /tmp, not tempfile.gettempdir(): the sysctl is the whole machine's, so is the lock,
# whatever TMPDIR each run sets.
LOCK = "/tmp/iocpnet-machine-state.lock"
WAIT_S = 600      # above the longest test (CI's 3.13t suite at load 17: ~60 s)
_POLL_S = 0.02


def _open(path):
    # A lock file another user made may not be writable: flock needs only a read-only
    # open.  O_CREAT only when missing (fs.protected_regular refuses O_CREAT on another
    # user's file in a sticky directory such as /tmp).
    while True:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            pass
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            continue                    # made by another process meanwhile
        os.fchmod(fd, 0o644)            # whatever the umask: others must open it too
        return fd


def _flock(fd, how, path, deadline, wait_s, what):
    while True:
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{what}: {path} still held by another test after {wait_s} s "
                f"(some process on this machine holds it: fuser -v {path})")
        time.sleep(_POLL_S)


@contextlib.contextmanager
def shared(lock=LOCK, wait_s=WAIT_S):
    """Held by every test: no machine_state test runs meanwhile, in any process."""
    deadline = time.monotonic() + wait_s
    gate = _open(lock + ".turnstile")
    try:
        _flock(gate, fcntl.LOCK_SH, lock + ".turnstile", deadline, wait_s,
               "waiting for a machine_state test to end")
        fd = _open(lock)
        try:
            _flock(fd, fcntl.LOCK_SH, lock, deadline, wait_s,
                   "waiting for a machine_state test to end")
        except BaseException:
            os.close(fd)
            raise
    finally:
        os.close(gate)                  # through the turnstile: it is not held meanwhile
    try:
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive(lock=LOCK, wait_s=WAIT_S):
    """Held by a machine_state test: no other test runs meanwhile, in any process."""
    deadline = time.monotonic() + wait_s
    gate = _open(lock + ".turnstile")
    fd = None
    try:
        _flock(gate, fcntl.LOCK_EX, lock + ".turnstile", deadline, wait_s,
               "machine_state test waiting for another one")
        fd = _open(lock)
        _flock(fd, fcntl.LOCK_EX, lock, deadline, wait_s,
               "machine_state test waiting for the other tests to end")
        yield
    finally:
        if fd is not None:
            os.close(fd)
        os.close(gate)
