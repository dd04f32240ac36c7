"""A line-based client for examples/chat_server.py, itself built on iocpnet
(a ClientService with one PacketSession).

Interactive:

    python examples/chat_client.py --port 11022 --nick alice --join lobby
    > hello everyone             (says it in the current room: the last one joined)
    > /join games   /leave games   /nick bob   /rooms   /who [room]   /quit

Scripted (for tests and demos): join, wait until the room has M members, say N
numbered messages, and wait until N*K messages were heard in the room:

    python examples/chat_client.py --nick c1 --join lobby --wait-members 3 \\
        --say hello --count 5 --expect 15

Everything heard is printed one event per line:

    * you are c1                 [lobby] * c2 joined          [lobby] <c2> hello 1
    [lobby] * here: c1, c2       [lobby] * c2 left            * c2 is now known as bob
    * rooms: lobby (2)           ! error: you are not in games

The exit status is 0 when the script ran to its end, 1 on a timeout, an error packet
or a lost connection.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Set, TextIO

import iocpnet
from iocpnet import chat_protocol as proto


class ChatState:
    """What the client knows, updated by the session on a worker thread and waited on
    by the main thread."""

    def __init__(self, out: TextIO) -> None:
        self.cond = threading.Condition()
        self.out = out
        self.nick: Optional[str] = None
        self.members: Dict[str, List[str]] = {}       # rooms we are in -> who is there
        # Rooms whose member list a WHO answer has set (later answers replace it).
        self.listed: Set[str] = set()
        # Joins heard in a room before our own S_JOINED or S_WHO for it: with rooms
        # shared through Redis, the order of those three may vary.
        self.early: Dict[str, List[str]] = {}
        self.heard: Dict[str, int] = {}               # room -> S_SAID packets heard
        self.errors: List[str] = []
        self.disconnected: Optional[str] = None

    def show(self, line: str) -> None:
        # One writer at a time, whole lines: events come from a worker thread while the
        # main thread may print too.
        with self.cond:
            self.out.write(line + "\n")
            self.out.flush()

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                if self.disconnected is not None:
                    raise ChatError(f"disconnected while waiting for {what}: "
                                    f"{self.disconnected}")
                if self.errors:
                    raise ChatError(f"error while waiting for {what}: {self.errors[-1]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ChatError(f"timed out after {timeout:g} s waiting for {what}")
                self.cond.wait(left)


class ChatError(Exception):
    pass


handler = iocpnet.PacketHandler()


class ChatClientSession(iocpnet.PacketSession):
    handler = handler

    def __init__(self, state: ChatState) -> None:
        self.state = state

    def OnDisconnected(self, reason: str) -> None:
        st = self.state
        with st.cond:
            st.disconnected = reason
            st.cond.notify_all()

    def OnConnectFailed(self, reason: str) -> None:
        self.state.show(f"! cannot connect: {reason}")


def _update(session: ChatClientSession, change: Callable[[ChatState], None]) -> None:
    st = session.state
    with st.cond:
        change(st)
        st.cond.notify_all()


@handler.route(proto.S_WELCOME)
def on_welcome(session: ChatClientSession, payload: bytes) -> None:
    name = proto.Reader(payload).str8()
    _update(session, lambda st: setattr(st, "nick", name))
    session.state.show(f"* you are {name}")


@handler.route(proto.S_JOINED)
def on_joined(session: ChatClientSession, payload: bytes) -> None:
    r = proto.Reader(payload)
    room, name = r.str8(), r.str8()

    def change(st: ChatState) -> None:
        if name == st.nick:
            if room not in st.members:
                st.members[room] = [name] + [n for n in st.early.pop(room, [])
                                             if n != name]
        elif room in st.members:
            if name not in st.members[room]:
                st.members[room].append(name)
        elif name not in st.early.setdefault(room, []):
            st.early[room].append(name)
    _update(session, change)
    session.state.show(f"[{room}] * {name} joined")


@handler.route(proto.S_LEFT)
def on_left(session: ChatClientSession, payload: bytes) -> None:
    r = proto.Reader(payload)
    room, name = r.str8(), r.str8()

    def change(st: ChatState) -> None:
        if name == st.nick:
            st.members.pop(room, None)
            st.listed.discard(room)
            st.early.pop(room, None)
        elif name in st.members.get(room, []):
            st.members[room].remove(name)
        elif name in st.early.get(room, []):
            st.early[room].remove(name)
    _update(session, change)
    session.state.show(f"[{room}] * {name} left")


@handler.route(proto.S_SAID)
def on_said(session: ChatClientSession, payload: bytes) -> None:
    r = proto.Reader(payload)
    room, name, text = r.str8(), r.str8(), r.text()
    session.state.show(f"[{room}] <{name}> {text}")

    def change(st: ChatState) -> None:
        st.heard[room] = st.heard.get(room, 0) + 1
    _update(session, change)


@handler.route(proto.S_NICK)
def on_nick(session: ChatClientSession, payload: bytes) -> None:
    r = proto.Reader(payload)
    old, new = r.str8(), r.str8()

    def change(st: ChatState) -> None:
        if st.nick == old:
            st.nick = new
        for names in st.members.values():
            if old in names:
                names[names.index(old)] = new
    _update(session, change)
    session.state.show(f"* {old} is now known as {new}")


@handler.route(proto.S_ROOMS)
def on_rooms(session: ChatClientSession, payload: bytes) -> None:
    r = proto.Reader(payload)
    rooms = [f"{r.str8()} ({r.u16()})" for _ in range(r.u16())]
    session.state.show(f"* rooms: {', '.join(rooms) or '(none)'}")


@handler.route(proto.S_WHO)
def on_who(session: ChatClientSession, payload: bytes) -> None:
    r = proto.Reader(payload)
    room = r.str8()
    names = [r.str8() for _ in range(r.u16())]
    st = session.state

    def change(st: ChatState) -> None:
        if st.nick not in names:
            return
        if room in st.listed:                # a /who: the list as it is now
            st.members[room] = list(names)
            return
        # The answer to our join: with shared rooms, joins we heard before it may be
        # missing from it.
        st.listed.add(room)
        known = st.members.get(room, []) + st.early.pop(room, [])
        st.members[room] = list(names) + [n for n in known if n not in names]
    _update(session, change)
    st.show(f"[{room}] * here: {', '.join(names) or '(nobody)'}")


@handler.route(proto.S_ERROR)
def on_error(session: ChatClientSession, payload: bytes) -> None:
    reason = proto.Reader(payload).text()
    _update(session, lambda st: st.errors.append(reason))
    session.state.show(f"! error: {reason}")


class ChatClient:
    """One connection to the chat server, driven from the main thread."""

    def __init__(self, host: str, port: int, out: TextIO) -> None:
        self.state = ChatState(out)
        self.core = iocpnet.IocpCore()
        self.session: Optional[ChatClientSession] = None
        self.service = iocpnet.ClientService(self.core, (host, port), self._make_session, 1)
        self.worker = threading.Thread(target=self._work, name="chat-worker", daemon=True)

    def _make_session(self) -> ChatClientSession:
        self.session = ChatClientSession(self.state)
        return self.session

    def _work(self) -> None:
        while self.core.Dispatch() >= 0:
            pass

    def connect(self, timeout: float) -> None:
        self.worker.start()
        self.service.Start()
        self.state.wait(lambda: self.state.nick is not None, timeout, "the welcome")

    def send(self, packet: bytes) -> None:
        if self.session is None or not self.session.Send(packet):
            raise ChatError(f"not connected ({self.state.disconnected or 'no session'})")

    def close(self) -> None:
        self.session = None
        self.service.Stop(5.0)
        self.core.Close(5.0)
        self.worker.join(5.0)


def run_script(client: ChatClient, args: argparse.Namespace) -> None:
    st = client.state
    t = args.timeout
    if args.nick:
        client.send(proto.nick(args.nick))
        st.wait(lambda: st.nick == args.nick, t, f"the nick {args.nick}")
    for room in args.join:
        client.send(proto.join(room))
        st.wait(lambda: room in st.members, t, f"joining {room}")
    room = args.join[-1] if args.join else None
    if args.wait_members:
        if room is None:
            raise ChatError("--wait-members needs --join")
        st.wait(lambda: len(st.members.get(room, [])) >= args.wait_members, t,
                f"{args.wait_members} members in {room}")
    if args.say is not None:
        if room is None:
            raise ChatError("--say needs --join")
        for i in range(1, args.count + 1):
            client.send(proto.say(room, f"{args.say} {i}"))
            if args.interval:
                time.sleep(args.interval)
    expect = args.expect if args.expect is not None else \
        (args.count if args.say is not None else 0)
    if expect:
        assert room is not None
        st.wait(lambda: st.heard.get(room, 0) >= expect, t,
                f"{expect} messages in {room} (heard {st.heard.get(room, 0)})")


def run_interactive(client: ChatClient, stdin: TextIO) -> None:
    st = client.state
    current: Optional[str] = None
    commands = "/join ROOM, /leave [ROOM], /nick NAME, /rooms, /who [ROOM], /quit"
    st.show(f"* commands: {commands}; other lines are said in the current room")
    done = threading.Event()

    def read() -> None:
        nonlocal current
        try:
            for raw in stdin:
                line = raw.rstrip("\n")
                if not line:
                    continue
                cmd, _, arg = line.partition(" ")
                arg = arg.strip()
                if cmd == "/quit":
                    break
                elif cmd == "/join" and arg:
                    client.send(proto.join(arg))
                    current = arg
                elif cmd == "/leave":
                    target = arg or current
                    if target:
                        client.send(proto.leave(target))
                        if target == current:
                            current = None
                elif cmd == "/nick" and arg:
                    client.send(proto.nick(arg))
                elif cmd == "/rooms":
                    client.send(proto.rooms())
                elif cmd == "/who":
                    target = arg or current
                    if target:
                        client.send(proto.who(target))
                elif cmd.startswith("/"):
                    st.show(f"! commands: {commands}")
                elif current is None:
                    st.show("! join a room first: /join ROOM")
                else:
                    client.send(proto.say(current, line))
        except ChatError as e:
            st.show(f"! {e}")
        finally:
            done.set()

    for room in client_rooms(st):
        current = room
    threading.Thread(target=read, name="stdin", daemon=True).start()
    # Wait for /quit, the end of stdin, or the server going away (Ctrl-C too).
    while not done.wait(0.2):
        if st.disconnected is not None:
            st.show(f"* disconnected: {st.disconnected}")
            return


def client_rooms(st: ChatState) -> List[str]:
    with st.cond:
        return list(st.members)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=11022)
    p.add_argument("--nick", help="the nick to take (default: the server's guest-N)")
    p.add_argument("--join", action="append", default=[], metavar="ROOM",
                   help="join this room (repeatable; the last is the current room)")
    p.add_argument("--wait-members", type=int, default=0, metavar="M",
                   help="scripted: wait until the room has M members before saying")
    p.add_argument("--say", metavar="TEXT", help="scripted: say 'TEXT 1' .. 'TEXT N'")
    p.add_argument("--count", type=int, default=1, metavar="N")
    p.add_argument("--interval", type=float, default=0.0, help="seconds between messages")
    p.add_argument("--expect", type=int, default=None, metavar="K",
                   help="scripted: wait until K messages were heard in the room "
                        "(default: N, our own)")
    p.add_argument("--timeout", type=float, default=20.0,
                   help="seconds each scripted step may take")
    args = p.parse_args(argv)
    scripted = args.say is not None or args.expect is not None or args.wait_members > 0
    client = ChatClient(args.host, args.port, sys.stdout)
    try:
        client.connect(args.timeout)
        if scripted:
            run_script(client, args)
        else:
            run_script(client, argparse.Namespace(**{**vars(args), "say": None,
                                                     "expect": None}))
            run_interactive(client, sys.stdin)
        return 0
    except ChatError as e:
        print(f"chat_client: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
