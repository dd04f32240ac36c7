"""A whole-stream WebSocket frame decoder written from RFC 6455 alone (no code shared
with iocpnet's C parser): the reference the hypothesis tests compare
``iocpnet.parse_websocket_frames`` and real sessions with.

``parse(data, server, max_message)`` returns ``(events, error_code)`` in the shape of
``parse_websocket_frames``: events ``("text", str)``, ``("binary", bytes)``,
``("ping", bytes)``, ``("pong", bytes)``, ``("close", code, reason)``; error_code None
or the close code of the first protocol error (1002, 1007, 1009)."""
import codecs
import struct

VALID_CLOSE = set(range(1000, 1004)) | set(range(1007, 1015)) | set(range(3000, 5000))


def _utf8_prefix_ok(data, final):
    """Whether data is valid UTF-8 (final) or the start of some valid UTF-8."""
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    try:
        dec.decode(data, final=final)
    except UnicodeDecodeError:
        return False
    return True


def parse(data, server=True, max_message=1 << 20):
    events = []
    i, n = 0, len(data)
    msg_op, msg = 0, bytearray()
    while True:
        if n - i < 2:
            return events, None
        b0, b1 = data[i], data[i + 1]
        fin, rsv, op = b0 >> 7, (b0 >> 4) & 7, b0 & 15
        masked, length = b1 >> 7, b1 & 127
        h = 2
        if length == 126:
            if n - i < 4:
                return events, None
            length = struct.unpack_from("!H", data, i + 2)[0]
            h = 4
        elif length == 127:
            if n - i < 10:
                return events, None
            length = struct.unpack_from("!Q", data, i + 2)[0]
            h = 10
        key = b"\0\0\0\0"
        if masked:
            if n - i < h + 4:
                return events, None
            key = data[i + h:i + h + 4]
            h += 4
        if rsv or op in (3, 4, 5, 6, 7) or op > 10:
            return events, 1002
        if (b1 & 127) == 127 and length >> 63:
            return events, 1002
        if bool(masked) != bool(server):
            return events, 1002
        if op >= 8 and (not fin or length > 125):
            return events, 1002
        if op == 0 and not msg_op:
            return events, 1002
        if op in (1, 2) and msg_op:
            return events, 1002
        if op < 8 and max_message and (len(msg) if op == 0 else 0) + length > max_message:
            return events, 1009
        i += h
        raw = data[i:i + length]
        plain = bytes(b ^ key[k % 4] for k, b in enumerate(raw))
        complete = len(raw) == length
        if op >= 8:
            if not complete:
                return events, None
            i += length
            if op == 9:
                events.append(("ping", plain))
            elif op == 10:
                events.append(("pong", plain))
            elif length == 0:
                events.append(("close", 1005, ""))
            elif length == 1:
                return events, 1002
            else:
                code = struct.unpack("!H", plain[:2])[0]
                if code not in VALID_CLOSE:
                    return events, 1002
                if not _utf8_prefix_ok(plain[2:], True):
                    return events, 1007
                events.append(("close", code, plain[2:].decode()))
            continue
        if op:
            msg_op, msg = op, bytearray()
        msg += plain
        if msg_op == 1 and not _utf8_prefix_ok(bytes(msg), complete and bool(fin)):
            return events, 1007
        if not complete:
            return events, None
        i += length
        if fin:
            events.append(("text", msg.decode()) if msg_op == 1 else ("binary", bytes(msg)))
            msg_op = 0
