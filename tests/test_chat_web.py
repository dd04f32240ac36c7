"""The chat example's browser client in a real browser: headless Chromium (Debian's
``chromium``, installed by scripts/test.sh) opens two pages of
``examples/chat_server.py --web-port``, a native TCP client joins the same room, each of
the three says something, and every one of them sees every message.

Chromium is driven through its DevTools protocol (over a WebSocket, with the
`websockets` library).  IOCPNET_CHAT_SCREENSHOT=path also saves a screenshot of the
first page there (docs/chat_web.png is made that way)."""
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import pytest

websockets = pytest.importorskip("websockets")
from websockets.sync.client import connect as ws_connect  # noqa: E402

from iocpnet import chat_protocol as proto  # noqa: E402

from conftest import connect, recv_exactly  # noqa: E402
from subproc import EXAMPLES, Proc  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="no chromium (scripts/test.sh installs it)")


def _browser_env():
    """The browser is not the code under test: under scripts/sanitize.sh it must not
    inherit the sanitizer runtimes preloaded for our extension."""
    return {k: v for k, v in os.environ.items()
            if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS")}


class Browser:
    """Headless Chromium and one DevTools connection to it (flattened sessions)."""

    def __init__(self):
        self.profile = tempfile.mkdtemp(prefix="iocpnet-chromium-")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
             "--window-size=900,520", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env=_browser_env())
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                url = m.group(1)
        assert url, "chromium did not start"
        # Keep draining stderr, or chromium may block writing to it.
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()
        self._ws_cm = ws_connect(url, max_size=None)
        self.ws = self._ws_cm.__enter__()
        self.next_id = 0
        self.lock = threading.Lock()

    def call(self, method, session=None, **params):
        with self.lock:
            self.next_id += 1
            mid = self.next_id
            msg = {"id": mid, "method": method, "params": params}
            if session:
                msg["sessionId"] = session
            self.ws.send(json.dumps(msg))
            while True:
                reply = json.loads(self.ws.recv(timeout=30))
                if reply.get("id") == mid:
                    assert "error" not in reply, reply
                    return reply["result"]

    def open(self, url):
        target = self.call("Target.createTarget", url=url)["targetId"]
        return self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def eval(self, session, expression):
        r = self.call("Runtime.evaluate", session, expression=expression,
                      returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in r, r
        return r["result"].get("value")

    def wait(self, session, expression, timeout=20):
        deadline = time.monotonic() + timeout
        while True:
            v = self.eval(session, expression)
            if v:
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expression}")
            time.sleep(0.05)

    def close(self):
        try:
            self._ws_cm.__exit__(None, None, None)
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            shutil.rmtree(self.profile, ignore_errors=True)


class NativeClient:
    """The chat protocol over plain TCP, the way examples/chat_client.py speaks it."""

    def __init__(self, port):
        self.sock = connect(("127.0.0.1", port))
        self.heard = []
        self.nick = None
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            while True:
                h = recv_exactly(self.sock, 4)
                size, pid = h[0] | h[1] << 8, h[2] | h[3] << 8
                r = proto.Reader(recv_exactly(self.sock, size - 4))
                with self.lock:
                    if pid == proto.S_WELCOME:
                        self.nick = r.str8()
                    elif pid == proto.S_SAID:
                        self.heard.append((r.str8(), r.str8(), r.text()))
        except (ConnectionError, OSError):
            pass

    def said(self):
        with self.lock:
            return list(self.heard)


def test_two_browser_pages_and_a_native_client_share_a_room(backend):
    server = Proc.python(str(EXAMPLES / "chat_server.py"), "--host", "127.0.0.1",
                         "--port", 0, "--web-port", 0, "--workers", 2, backend=backend)
    browser = None
    native = None
    try:
        tcp_port = server.port(r"chat server on 127\.0\.0\.1:(\d+)")
        web_port = server.port(r"web client on http://127\.0\.0\.1:(\d+)/")
        browser = Browser()
        pages = [browser.open(f"http://127.0.0.1:{web_port}/") for _ in range(2)]
        nicks = [browser.wait(p, "window.chat && chat.open && chat.nick") for p in pages]
        # The first page through its form, the second through its API.
        browser.eval(pages[0], "document.getElementById('nick').value = 'alice';"
                               "document.getElementById('setnick').click();"
                               "document.getElementById('join').click()")
        browser.eval(pages[1], "chat.rename('bob'); chat.join('lobby')")
        for p, name in zip(pages, ("alice", "bob")):
            browser.wait(p, f"chat.nick === '{name}' && chat.members.lobby && "
                            f"chat.members.lobby.has('{name}')")
        native = NativeClient(tcp_port)
        deadline = time.monotonic() + 10
        while native.nick is None and time.monotonic() < deadline:
            time.sleep(0.02)
        native.sock.sendall(proto.nick("carol") + proto.join("lobby"))
        for p in pages:
            browser.wait(p, "chat.members.lobby && chat.members.lobby.size === 3")
        # Everyone says something: alice by typing, bob by the API, carol natively.
        browser.eval(pages[0], "document.getElementById('text').value = 'hello from alice';"
                               "document.getElementById('say').click()")
        browser.eval(pages[1], "chat.say('lobby', 'bonjour de bob ✓')")
        native.sock.sendall(proto.say("lobby", "hi from carol (native TCP)"))
        want = {("alice", "hello from alice"), ("bob", "bonjour de bob ✓"),
                ("carol", "hi from carol (native TCP)")}
        for p in pages:
            got = browser.wait(p, "(() => { const m = chat.log.filter(e => e.kind === 'msg');"
                                  " return m.length >= 3 && m; })()")
            assert {(e["who"], e["text"]) for e in got} == want
        deadline = time.monotonic() + 10
        while len(native.said()) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert {(n, t) for room, n, t in native.said()} == want
        assert all(room == "lobby" for room, _, _ in native.said())
        # The same order everywhere: the room broadcasts under its lock.
        orders = [[(e["who"], e["text"]) for e in browser.eval(
            p, "chat.log.filter(e => e.kind === 'msg')")] for p in pages]
        orders.append([(n, t) for _, n, t in native.said()])
        assert orders[0] == orders[1] == orders[2]
        shot = os.environ.get("IOCPNET_CHAT_SCREENSHOT")
        if shot:
            png = browser.call("Page.captureScreenshot", pages[0], format="png")["data"]
            with open(shot, "wb") as f:
                f.write(base64.b64decode(png))
        del nicks
    finally:
        if native is not None:
            native.sock.close()
        if browser is not None:
            browser.close()
        server.signal(__import__("signal").SIGTERM)
        assert server.wait(30) == 0, server.output
