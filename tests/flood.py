"""Threads that Post() as fast as they can: the flood the Post bounds are tested with.

What it owns.  ``PostFlood(post, threads=2)`` starts `threads` threads calling
``post()`` in a loop until the block ends (a context manager; the threads are joined on
exit).  A ``queue.Full`` it raises is recorded in ``refused`` (its message) and the
thread goes on; a return of ``False`` (a session or group that ended: Post says so) is
recorded in ``ended`` and ends that thread.  ``refused`` and ``ended`` are lists,
appended to from the threads (list.append is atomic, also on free-threaded builds).
"""
import queue
import threading


class PostFlood:
    def __init__(self, post, threads=2):
        self._post = post
        self._stop = threading.Event()
        self.refused = []
        self.ended = []
        self._threads = [threading.Thread(target=self._run, name=f"post-flood-{i}")
                         for i in range(threads)]

    def _run(self):
        while not self._stop.is_set():
            try:
                if self._post() is False:
                    self.ended.append(True)
                    return
            except queue.Full as e:
                self.refused.append(str(e))

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        for t in self._threads:
            t.join(10)
