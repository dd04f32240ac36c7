"""Session factories that misbehave on purpose, for the tests and tests/stress."""
import threading
import time


def failing_factory(make):
    """A session factory that raises while the returned event is set (noting the time
    of each such call in the returned list) and otherwise returns make()."""
    failing = threading.Event()
    calls = []

    def factory():
        if failing.is_set():
            calls.append(time.monotonic())
            raise RuntimeError("the session pool is empty")
        return make()
    return factory, failing, calls
