"""Prometheus exposition of a Service's figures (``pip install iocpnet[metrics]``).

``service.ServeMetrics(port)`` serves them over HTTP at ``/metrics`` (any path answers);
``ServiceCollector(service)`` puts them in a registry of your own, e.g. the default one
next to your application's metrics::

    from prometheus_client import REGISTRY
    REGISTRY.register(iocpnet.metrics.ServiceCollector(service, name="game"))

Nothing is counted here: each scrape calls ``service.stats()`` (one pass over the live
sessions under the service's lock) and turns it into metric families, through the
official ``prometheus_client`` package.  The collector holds the service weakly, so a
registry outliving a service does not keep it alive (it then exports nothing).

Every family carries the label ``backend`` (io_uring, epoll, iocp) and, when a name was
given, ``service``.  The families:

=====================================  =========  ==========================================
``iocpnet_sessions``                   gauge      live sessions
``iocpnet_sessions_started_total``     counter    sessions started
``iocpnet_accepts_total``              counter    connections accepted (refused ones too)
``iocpnet_accept_errors_total``        counter    accepts that failed
``iocpnet_factory_failures_total``     counter    session factory calls that raised
``iocpnet_send_timeouts_total``        counter    sessions ended by send_timeout
``iocpnet_refused_connections_total``  counter    refused at accept, label ``reason``
``iocpnet_disconnects_total``          counter    ended sessions, label ``reason`` (a bucket)
``iocpnet_received_bytes_total``       counter    also ``_sent_bytes``, ``_received_messages``,
                                                  ``_sent_messages``
``iocpnet_send_queue_bytes``           gauge      queued and unsent, all sessions
``iocpnet_send_queue_max_bytes``       gauge      the largest one session has queued
``iocpnet_hook_seconds``               summary    per hook (``measure_hooks`` classes)
``iocpnet_hook_max_seconds``           gauge      the slowest call of each hook
``iocpnet_dispatch_batch_size``        histogram  completions per batch (of the core)
``iocpnet_dispatch_seconds_total``     counter    time spent dispatching batches
``iocpnet_dispatch_max_seconds``       gauge      the longest batch
``iocpnet_address_table_entries``      gauge      per-address limit table, label ``table``
``iocpnet_address_table_evictions_total`` counter addresses forgotten while not refilled
=====================================  =========  ==========================================
"""
from __future__ import annotations

import socket
import socketserver
import threading
import time
import weakref
from typing import Any, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric, SummaryMetricFamily)

__all__ = ["MetricsServer", "ServiceCollector"]


class ServiceCollector:
    """A prometheus_client collector reading ``service.stats()`` at each scrape."""

    def __init__(self, service: Any, name: str | None = None) -> None:
        self._service = weakref.ref(service)
        self.name = name

    def collect(self) -> Iterator[Metric]:
        service = self._service()
        if service is None:
            return
        st = service.stats()
        names = ["backend"] + (["service"] if self.name is not None else [])
        base = [st["backend"]] + ([self.name] if self.name is not None else [])

        def gauge(name: str, doc: str, value: float) -> Metric:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(base, value)
            return g

        def counter(name: str, doc: str, value: float) -> Metric:
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(base, value)
            return c

        def by(name: str, doc: str, label: str, values: dict[str, int]) -> Metric:
            c = CounterMetricFamily(name, doc, labels=names + [label])
            for key, value in values.items():
                c.add_metric(base + [key], value)
            return c

        yield gauge("iocpnet_sessions", "Live sessions.", st["sessions"]["live"])
        yield counter("iocpnet_sessions_started", "Sessions started.",
                      st["sessions"]["total"])
        yield counter("iocpnet_accepts", "Connections accepted, refused ones included.",
                      st["accepts"])
        yield counter("iocpnet_accept_errors", "Accepts that failed.", st["accept_errors"])
        yield counter("iocpnet_factory_failures", "Session factory calls that raised.",
                      st.get("factory_failures", 0))
        yield counter("iocpnet_send_timeouts",
                      "Sessions ended because their send queue made no progress.",
                      st.get("send_timeouts", 0))
        yield by("iocpnet_refused_connections", "Connections refused at accept, by reason.",
                 "reason", st["refused"])
        yield by("iocpnet_disconnects", "Sessions ended, by reason.", "reason",
                 st["disconnects"])
        yield counter("iocpnet_received_bytes", "Bytes received.", st["bytes_in"])
        yield counter("iocpnet_sent_bytes", "Bytes sent.", st["bytes_out"])
        yield counter("iocpnet_received_messages",
                      "Messages received (chunks for a Session, packets for a "
                      "PacketSession).", st["messages_in"])
        yield counter("iocpnet_sent_messages", "Send() calls that queued bytes.",
                      st["messages_out"])
        yield gauge("iocpnet_send_queue_bytes", "Bytes queued and not yet sent.",
                    st["send_queue_bytes"])
        yield gauge("iocpnet_send_queue_max_bytes",
                    "The most bytes one session has queued and not yet sent.",
                    st["send_queue_bytes_max"])
        if st["hooks"]:
            hs = SummaryMetricFamily("iocpnet_hook_seconds", "Time in each hook.",
                                     labels=names + ["hook"])
            hm = GaugeMetricFamily("iocpnet_hook_max_seconds",
                                   "The slowest call of each hook.", labels=names + ["hook"])
            for hook, h in st["hooks"].items():
                hs.add_metric(base + [hook], h["count"], h["seconds"])
                hm.add_metric(base + [hook], h["seconds_max"])
            yield hs
            yield hm
        d = st["dispatch"]
        buckets = []
        cumulative = 0
        for bound, count in sorted(d["batch_sizes"].items()):
            cumulative += count
            buckets.append((str(bound), cumulative))
        buckets[-1] = ("+Inf", cumulative)
        hist = HistogramMetricFamily("iocpnet_dispatch_batch_size",
                                     "Completions per dispatched batch.", labels=names)
        hist.add_metric(base, buckets, d["completions"])
        yield hist
        yield counter("iocpnet_dispatch_seconds", "Time spent dispatching batches.",
                      d["seconds"])
        yield gauge("iocpnet_dispatch_max_seconds", "The longest batch.", d["seconds_max"])
        t = st["address_table"]
        entries = GaugeMetricFamily("iocpnet_address_table_entries",
                                    "Addresses held by the per-address limits.",
                                    labels=names + ["table"])
        entries.add_metric(base + ["live"], t["live"])
        entries.add_metric(base + ["recent"], t["recent"])
        yield entries
        yield counter("iocpnet_address_table_evictions",
                      "Addresses forgotten before their connection bucket refilled.",
                      t["evictions"])


class _QuietHandler(WSGIRequestHandler):
    def setup(self) -> None:
        # A connection that sends nothing held its thread for good: the request must
        # arrive (and the answer leave) within the server's request_timeout.
        super().setup()
        self.connection.settimeout(getattr(self.server, "request_timeout", None))

    def log_message(self, format: str, *args: Any) -> None:   # no line per scrape
        pass


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_timeout: float | None = None
    # Each connection has a thread for up to request_timeout: past this many at once a
    # connection is answered 503 and closed (a peer opening thousands held thousands).
    slots: threading.BoundedSemaphore | None = None

    # Each connection's whole request has request_timeout (the socket timeout bounds
    # one read only: a peer trickling a byte now and then held its slot for good).
    # serve_forever's loop (service_actions, every poll_interval) cuts the late ones.
    _deadlines: dict[Any, float] | None = None
    _deadlines_lock = threading.Lock()

    def service_actions(self) -> None:
        super().service_actions()
        if not self._deadlines:
            return
        now = time.monotonic()
        with self._deadlines_lock:
            late = [r for r, t in self._deadlines.items() if t <= now]
            for r in late:
                del self._deadlines[r]
        for r in late:
            try:
                r.shutdown(socket.SHUT_RDWR)     # its handler's read ends: EOF
            except OSError:
                pass

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.request_timeout is not None:
            with self._deadlines_lock:
                if self._deadlines is None:
                    self._deadlines = {}
                self._deadlines[request] = time.monotonic() + self.request_timeout
        if self.slots is not None and not self.slots.acquire(blocking=False):
            try:
                request.setblocking(False)
                request.send(b"HTTP/1.0 503 Service Unavailable\r\n"
                             b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            if self.slots is not None:
                self.slots.release()        # no thread was started to release it
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            if self.slots is not None:
                self.slots.release()

    def shutdown_request(self, request: Any) -> None:
        with self._deadlines_lock:
            if self._deadlines is not None:
                self._deadlines.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A peer that timed out or went away is no error of ours: no traceback on
        # stderr per such connection (socketserver prints one by default).
        import sys
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks the resolver for the host's full name (a reverse
        # lookup that can hang for seconds); the WSGI environment only needs the address.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = port
        self.setup_environ()


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """An HTTP server on its own thread answering every GET with the service's figures
    in the Prometheus text format.  ``port`` 0 picks a free port (read ``.port``).
    A connection whose request has not arrived whole within ``request_timeout`` seconds
    is closed (one thread serves each connection meanwhile); past ``max_connections``
    connections at once, a new one is answered 503 and closed at once."""

    def __init__(self, service: Any, port: int = 0, host: str = "127.0.0.1",
                 name: str | None = None, *, request_timeout: float = 10.0,
                 max_connections: int = 32) -> None:
        # Each connection's socket takes request_timeout as its timeout: past ~9e9 s (inf
        # too) that raised OverflowError in every handler thread, so every scrape failed
        # after the server was made.  A bool is no number of seconds or connections.
        if isinstance(request_timeout, bool) or not 0 < request_timeout <= 1e9:
            raise ValueError(f"request_timeout must be a number of seconds in (0, 1e9], "
                             f"not {request_timeout!r}")
        if isinstance(max_connections, bool) or not (isinstance(max_connections, int)
                                                     and max_connections > 0):
            raise ValueError(f"max_connections must be a positive int, not "
                             f"{max_connections!r}")
        self.registry = CollectorRegistry()
        self.registry.register(ServiceCollector(service, name))
        server_class = _Server6 if ":" in host else _Server
        self._httpd = make_server(host, port, make_wsgi_app(self.registry),
                                  server_class=server_class, handler_class=_QuietHandler)
        self._httpd.request_timeout = float(request_timeout)
        self._httpd.slots = threading.BoundedSemaphore(max_connections)
        self.host = host
        self.port: int = self._httpd.server_port
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name=f"iocpnet-metrics-{self.port}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "serving"
        return f"<MetricsServer http://{self.host}:{self.port}/metrics {state}>"

    def Close(self) -> None:
        """Stop serving and free the port (idempotent, any thread)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not threading.current_thread():
            self._thread.join(5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.Close()
