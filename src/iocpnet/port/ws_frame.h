/*
 * ws_frame.h -- the WebSocket (RFC 6455) frame layer, in plain C: a parser that is fed
 * bytes and returns events, a frame-header writer, masking and an incremental UTF-8
 * validator.  No I/O, no allocation, no Python: the Cython session layer
 * (core/websocket.pxi) drives it for servers and clients alike, and the fuzzer
 * (tests/fuzz/ws_fuzz.c) drives it alone.
 *
 * How it is used: call ws_parse(p, buf, n, &ev) repeatedly; each call consumes some of
 * buf and reports one event; WS_EV_MORE means every byte was consumed and more are
 * needed.  The parser keeps what it needs across calls itself (a partial frame header,
 * a control frame's payload, the UTF-8 state, the mask position), so the caller never
 * has to keep unconsumed bytes.  Data payloads are unmasked in place in buf (our own
 * receive buffer) and reported as chunks pointing into it: a message that arrives in
 * one piece is never copied before the caller turns it into bytes.
 *
 * What is refused, each with the close code the RFC asks for, before any payload byte
 * of the offending frame is looked at: reserved bits (no extension is negotiated),
 * reserved opcodes, a mask where none is allowed or none where one is required, a
 * control frame that is fragmented or longer than 125 bytes, a 64-bit length with its
 * top bit set, a continuation with nothing to continue, a data frame inside a
 * fragmented message (1002); a message whose size so far plus the announced frame
 * exceeds max_message (1009, checked on the header, so nothing is buffered for it);
 * invalid UTF-8 in a text message or a close reason (1007, as soon as the bad byte is
 * seen); a close frame with a 1-byte payload or a code nobody may send (1002).
 *
 * Nothing here is shared between threads: one parser belongs to one session, whose
 * receive completions run one at a time on its strand.
 */
#ifndef IOCPNET_WS_FRAME_H
#define IOCPNET_WS_FRAME_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum {
    WS_OP_CONT = 0x0,
    WS_OP_TEXT = 0x1,
    WS_OP_BINARY = 0x2,
    WS_OP_CLOSE = 0x8,
    WS_OP_PING = 0x9,
    WS_OP_PONG = 0xA
};

enum {
    WS_CLOSE_NORMAL = 1000,
    WS_CLOSE_GOING_AWAY = 1001,
    WS_CLOSE_PROTOCOL = 1002,
    WS_CLOSE_UNSUPPORTED = 1003,
    WS_CLOSE_NO_STATUS = 1005,     /* never sent: "the close frame had no code" */
    WS_CLOSE_ABNORMAL = 1006,      /* never sent: "no close frame at all" */
    WS_CLOSE_INVALID_DATA = 1007,
    WS_CLOSE_POLICY = 1008,
    WS_CLOSE_TOO_BIG = 1009,
    WS_CLOSE_INTERNAL = 1011
};

typedef enum ws_event_type {
    WS_EV_MORE = 0,    /* everything consumed; feed more bytes */
    WS_EV_DATA = 1,    /* a chunk of a text or binary message (data, len, first, last, text) */
    WS_EV_PING = 2,    /* a whole ping: its payload in data/len (at most 125 bytes) */
    WS_EV_PONG = 3,    /* a whole pong */
    WS_EV_CLOSE = 4,   /* a close frame: code (1005: none), reason in data/len (UTF-8) */
    WS_EV_ERROR = 5    /* the peer broke the protocol: fail with code, reason says why */
} ws_event_type;

typedef struct ws_event {
    ws_event_type type;
    const uint8_t *data;
    size_t len;
    int first;           /* DATA: the message's first chunk */
    int last;            /* DATA: the message's last chunk (the message is complete) */
    int text;            /* DATA: a text message (UTF-8 already checked) */
    int frame_fin;       /* DATA: the chunk's frame is its message's final frame */
    uint64_t frame_left; /* DATA: payload bytes of that frame still to come */
    unsigned code;       /* CLOSE: the peer's code; ERROR: the code to close with */
    const char *reason;  /* ERROR: a static string */
    uint64_t detail;     /* ERROR: a number for the reason (a size, an opcode, a code) */
} ws_event;

/* Incremental UTF-8 validation (RFC 3629: no overlongs, no surrogates, at most
 * U+10FFFF).  `need` continuation bytes are still expected; the next must be in
 * [lo, hi]. */
typedef struct ws_utf8 {
    uint8_t need, lo, hi;
} ws_utf8;

static inline void ws_utf8_init(ws_utf8 *u) {
    u->need = 0;
    u->lo = 0x80;
    u->hi = 0xBF;
}

/* 0 if s[0:n] continues valid UTF-8, -1 at the first byte that cannot. */
static inline int ws_utf8_feed(ws_utf8 *u, const uint8_t *s, size_t n) {
    size_t i = 0;
    unsigned need = u->need, lo = u->lo, hi = u->hi;
    while (i < n) {
        unsigned c;
        if (need == 0) {
            /* ASCII runs eight bytes at a time: most text is ASCII. */
            while (i + 8 <= n) {
                uint64_t w;
                memcpy(&w, s + i, 8);
                if (w & 0x8080808080808080ULL)
                    break;
                i += 8;
            }
            if (i >= n)
                break;
            c = s[i++];
            if (c < 0x80)
                continue;
            if (c < 0xC2)
                return -1;         /* a continuation byte first, or an overlong pair */
            if (c < 0xE0) {
                need = 1; lo = 0x80; hi = 0xBF;
            } else if (c < 0xF0) {
                need = 2;
                lo = c == 0xE0 ? 0xA0 : 0x80;   /* E0: no overlong three-byte form */
                hi = c == 0xED ? 0x9F : 0xBF;   /* ED: no UTF-16 surrogates */
            } else if (c < 0xF5) {
                need = 3;
                lo = c == 0xF0 ? 0x90 : 0x80;   /* F0: no overlong four-byte form */
                hi = c == 0xF4 ? 0x8F : 0xBF;   /* F4: nothing above U+10FFFF */
            } else {
                return -1;
            }
        } else {
            c = s[i++];
            if (c < lo || c > hi)
                return -1;
            need--;
            lo = 0x80;
            hi = 0xBF;
        }
    }
    u->need = (uint8_t)need;
    u->lo = (uint8_t)lo;
    u->hi = (uint8_t)hi;
    return 0;
}

static inline int ws_utf8_complete(const ws_utf8 *u) { return u->need == 0; }

/* dst[i] = src[i] ^ mask[(pos + i) % 4] for i < n (dst may be src); returns the
 * position after the last byte, for the next chunk of the same payload. */
static inline unsigned ws_mask(uint8_t *dst, const uint8_t *src, size_t n,
                               const uint8_t mask[4], unsigned pos) {
    size_t i = 0;
    pos &= 3;
    if (n >= 16) {
        uint8_t m8[8];
        uint64_t m, w;
        unsigned k;
        for (k = 0; k < 8; k++)
            m8[k] = mask[(pos + k) & 3];
        memcpy(&m, m8, 8);
        for (; i + 8 <= n; i += 8) {
            memcpy(&w, src + i, 8);
            w ^= m;
            memcpy(dst + i, &w, 8);
        }
    }
    for (; i < n; i++)
        dst[i] = src[i] ^ mask[(pos + i) & 3];
    return (unsigned)((pos + n) & 3);
}

/* A close code a peer may send (RFC 6455 7.4, and the IANA registry's 1012-1014). */
static inline int ws_close_code_valid(unsigned code) {
    if (code >= 3000 && code <= 4999)
        return 1;
    return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014);
}

/* Write a frame header into out (at least 14 bytes) for a payload of len bytes;
 * mask: NULL (a server's frames) or the 4-byte key (a client's; the payload must then
 * be masked with ws_mask from position 0).  Returns the header's size. */
static inline size_t ws_frame_header(uint8_t *out, unsigned opcode, int fin, uint64_t len,
                                     const uint8_t *mask) {
    size_t h = 2;
    out[0] = (uint8_t)((fin ? 0x80 : 0) | (opcode & 0x0F));
    if (len < 126) {
        out[1] = (uint8_t)len;
    } else if (len <= 0xFFFF) {
        out[1] = 126;
        out[2] = (uint8_t)(len >> 8);
        out[3] = (uint8_t)len;
        h = 4;
    } else {
        int k;
        out[1] = 127;
        for (k = 0; k < 8; k++)
            out[2 + k] = (uint8_t)(len >> (56 - 8 * k));
        h = 10;
    }
    if (mask != NULL) {
        out[1] |= 0x80;
        memcpy(out + h, mask, 4);
        h += 4;
    }
    return h;
}

enum { WS_S_HEADER = 0, WS_S_PAYLOAD = 1, WS_S_FAILED = 2 };

typedef struct ws_parser {
    /* set by ws_parser_init */
    uint64_t max_message;  /* bytes a data message may carry (0: no limit) */
    uint8_t expect_mask;   /* 1: frames must be masked (we are a server); 0: must not be */
    /* state */
    uint8_t state;
    uint8_t hlen;          /* header bytes gathered in h[] */
    uint8_t hneed;         /* header bytes this frame's header has (2 until known) */
    uint8_t h[14];
    uint8_t opcode, fin, masked, mpos;
    uint8_t mask[4];
    uint64_t remaining;    /* payload bytes of the current frame still to come */
    uint8_t msg_opcode;    /* the data message in progress: 0 none, 1 text, 2 binary */
    uint8_t msg_first;     /* its next chunk is its first */
    uint64_t msg_len;      /* its bytes so far, the current frame's counted whole */
    ws_utf8 utf8;          /* of the text message in progress */
    uint8_t ctl_len;       /* a control frame's payload gathered so far */
    uint8_t ctl[125];
    ws_event error;        /* the error reported (repeated if fed again) */
} ws_parser;

static inline void ws_parser_init(ws_parser *p, uint64_t max_message, int expect_mask) {
    memset(p, 0, sizeof(*p));
    p->max_message = max_message;
    p->expect_mask = expect_mask ? 1 : 0;
    p->hneed = 2;
    ws_utf8_init(&p->utf8);
}

static inline size_t ws__fail(ws_parser *p, ws_event *ev, size_t used, unsigned code,
                              const char *reason, uint64_t detail) {
    memset(ev, 0, sizeof(*ev));
    ev->type = WS_EV_ERROR;
    ev->code = code;
    ev->reason = reason;
    ev->detail = detail;
    p->error = *ev;
    p->state = WS_S_FAILED;
    return used;
}

/* The header in h[0:hneed] is complete: check it and start the payload.  Returns 0,
 * or -1 after filling ev with the error. */
static inline int ws__start_frame(ws_parser *p, ws_event *ev) {
    const uint8_t *h = p->h;
    unsigned op = h[0] & 0x0F, len7 = h[1] & 0x7F;
    uint64_t len;
    size_t k = 2;
    if (h[0] & 0x70) {
        ws__fail(p, ev, 0, WS_CLOSE_PROTOCOL, "reserved bits set (no extension negotiated)",
                 (h[0] >> 4) & 7);
        return -1;
    }
    if (!(op <= WS_OP_BINARY || (op >= WS_OP_CLOSE && op <= WS_OP_PONG))) {
        ws__fail(p, ev, 0, WS_CLOSE_PROTOCOL, "reserved opcode", op);
        return -1;
    }
    if (len7 == 126) {
        len = ((uint64_t)h[2] << 8) | h[3];
        k = 4;
    } else if (len7 == 127) {
        int i;
        len = 0;
        for (i = 0; i < 8; i++)
            len = (len << 8) | h[2 + i];
        k = 10;
        if (len >> 63) {
            ws__fail(p, ev, 0, WS_CLOSE_PROTOCOL, "frame length has its top bit set", 0);
            return -1;
        }
    } else {
        len = len7;
    }
    p->masked = (h[1] & 0x80) ? 1 : 0;
    if (p->masked != p->expect_mask) {
        ws__fail(p, ev, 0, WS_CLOSE_PROTOCOL,
                 p->expect_mask ? "unmasked frame from a client" : "masked frame from a server",
                 op);
        return -1;
    }
    if (p->masked)
        memcpy(p->mask, h + k, 4);
    p->mpos = 0;
    p->opcode = (uint8_t)op;
    p->fin = (h[0] & 0x80) ? 1 : 0;
    p->remaining = len;
    if (op >= WS_OP_CLOSE) {
        if (!p->fin) {
            ws__fail(p, ev, 0, WS_CLOSE_PROTOCOL, "fragmented control frame", op);
            return -1;
        }
        if (len > 125) {
            ws__fail(p, ev, 0, WS_CLOSE_PROTOCOL, "control frame longer than 125 bytes", len);
            return -1;
        }
        p->ctl_len = 0;
    } else {
        if (op == WS_OP_CONT) {
            if (p->msg_opcode == 0) {
                ws__fail(p, ev, 0, WS_CLOSE_PROTOCOL,
                         "continuation frame with no message to continue", 0);
                return -1;
            }
        } else {
            if (p->msg_opcode != 0) {
                ws__fail(p, ev, 0, WS_CLOSE_PROTOCOL,
                         "new data frame inside a fragmented message", op);
                return -1;
            }
            p->msg_opcode = (uint8_t)op;
            p->msg_first = 1;
            p->msg_len = 0;
            ws_utf8_init(&p->utf8);
        }
        if (p->max_message && (len > p->max_message || p->msg_len + len > p->max_message)) {
            ws__fail(p, ev, 0, WS_CLOSE_TOO_BIG, "message too big", p->msg_len + len);
            return -1;
        }
        p->msg_len += len;
    }
    p->state = WS_S_PAYLOAD;
    return 0;
}

/* A control frame's payload is complete in ctl[0:ctl_len]: report it. */
static inline size_t ws__control(ws_parser *p, ws_event *ev, size_t used) {
    memset(ev, 0, sizeof(*ev));
    ev->data = p->ctl;
    ev->len = p->ctl_len;
    p->state = WS_S_HEADER;
    p->hlen = 0;
    p->hneed = 2;
    if (p->opcode == WS_OP_PING) {
        ev->type = WS_EV_PING;
    } else if (p->opcode == WS_OP_PONG) {
        ev->type = WS_EV_PONG;
    } else {
        ws_utf8 u;
        ev->type = WS_EV_CLOSE;
        if (p->ctl_len == 0) {
            ev->code = WS_CLOSE_NO_STATUS;
        } else if (p->ctl_len == 1) {
            return ws__fail(p, ev, used, WS_CLOSE_PROTOCOL, "close frame with a 1-byte payload",
                            1);
        } else {
            ev->code = ((unsigned)p->ctl[0] << 8) | p->ctl[1];
            if (!ws_close_code_valid(ev->code))
                return ws__fail(p, ev, used, WS_CLOSE_PROTOCOL, "invalid close code", ev->code);
            ev->data = p->ctl + 2;
            ev->len = p->ctl_len - 2u;
            ws_utf8_init(&u);
            if (ws_utf8_feed(&u, ev->data, ev->len) != 0 || !ws_utf8_complete(&u))
                return ws__fail(p, ev, used, WS_CLOSE_INVALID_DATA,
                                "invalid UTF-8 in a close reason", 0);
        }
    }
    return used;
}

/* Consume bytes from buf[0:n] up to the next event; returns how many were consumed
 * and fills ev.  buf is written to: data payloads are unmasked in place. */
static inline size_t ws_parse(ws_parser *p, uint8_t *buf, size_t n, ws_event *ev) {
    size_t i = 0;
    if (p->state == WS_S_FAILED) {
        *ev = p->error;
        return n;
    }
    for (;;) {
        if (p->state == WS_S_HEADER) {
            while (p->hlen < p->hneed) {
                if (i >= n) {
                    memset(ev, 0, sizeof(*ev));
                    return i;                       /* WS_EV_MORE */
                }
                p->h[p->hlen++] = buf[i++];
                if (p->hlen == 2) {
                    unsigned len7 = p->h[1] & 0x7F;
                    p->hneed = (uint8_t)(2 + (len7 == 126 ? 2 : len7 == 127 ? 8 : 0) +
                                         ((p->h[1] & 0x80) ? 4 : 0));
                }
            }
            if (ws__start_frame(p, ev) != 0) {
                p->error = *ev;
                return i;
            }
            if (p->remaining == 0) {
                if (p->opcode >= WS_OP_CLOSE)
                    return ws__control(p, ev, i);
                p->state = WS_S_HEADER;
                p->hlen = 0;
                p->hneed = 2;
                if (p->fin) {
                    /* An empty final frame: the message ends here. */
                    memset(ev, 0, sizeof(*ev));
                    ev->type = WS_EV_DATA;
                    ev->data = buf + i;
                    ev->first = p->msg_first;
                    ev->last = 1;
                    ev->frame_fin = 1;
                    ev->text = p->msg_opcode == WS_OP_TEXT;
                    if (ev->text && !ws_utf8_complete(&p->utf8))
                        return ws__fail(p, ev, i, WS_CLOSE_INVALID_DATA,
                                        "invalid UTF-8 in a text message (cut sequence)", 0);
                    p->msg_opcode = 0;
                    p->msg_first = 0;
                    return i;
                }
                continue;                           /* an empty fragment: nothing to say */
            }
        }
        /* WS_S_PAYLOAD */
        if (i >= n) {
            memset(ev, 0, sizeof(*ev));
            return i;
        }
        {
            size_t k = n - i;
            uint8_t *d = buf + i;
            if ((uint64_t)k > p->remaining)
                k = (size_t)p->remaining;
            if (p->masked)
                p->mpos = (uint8_t)ws_mask(d, d, k, p->mask, p->mpos);
            i += k;
            p->remaining -= k;
            if (p->opcode >= WS_OP_CLOSE) {
                memcpy(p->ctl + p->ctl_len, d, k);
                p->ctl_len = (uint8_t)(p->ctl_len + k);
                if (p->remaining == 0)
                    return ws__control(p, ev, i);
                continue;
            }
            memset(ev, 0, sizeof(*ev));
            ev->type = WS_EV_DATA;
            ev->data = d;
            ev->len = k;
            ev->first = p->msg_first;
            ev->text = p->msg_opcode == WS_OP_TEXT;
            ev->frame_fin = p->fin;
            ev->frame_left = p->remaining;
            p->msg_first = 0;
            if (ev->text && ws_utf8_feed(&p->utf8, d, k) != 0)
                return ws__fail(p, ev, i, WS_CLOSE_INVALID_DATA,
                                "invalid UTF-8 in a text message", 0);
            if (p->remaining == 0) {
                p->state = WS_S_HEADER;
                p->hlen = 0;
                p->hneed = 2;
                if (p->fin) {
                    ev->last = 1;
                    if (ev->text && !ws_utf8_complete(&p->utf8))
                        return ws__fail(p, ev, i, WS_CLOSE_INVALID_DATA,
                                        "invalid UTF-8 in a text message (cut sequence)", 0);
                    p->msg_opcode = 0;
                }
            }
            return i;
        }
    }
}

#endif /* IOCPNET_WS_FRAME_H */
