/*
 * ws_fuzz.c -- libFuzzer target for the WebSocket frame parser (src/iocpnet/port/ws_frame.h)
 * that every WebSocket session runs on the bytes it receives.
 *
 * Input: one byte of settings (bit 0: we are a server, so frames must be masked; bits
 * 1-3 choose max_message from 0 (no limit), 1, 125, 126, 1000, 65535, 65536, 1 MiB),
 * one byte that seeds where the stream is cut, then the stream.  For each input:
 *
 *   1. The stream is parsed whole (one ws_parse loop over a copy) and by an independent
 *      reference written here from RFC 6455 alone (it decodes whole frames, checks UTF-8
 *      by decoding code points, never unmasks in place): the same messages, pings, pongs
 *      and close, and the same error code, in the same order.
 *   2. The same stream is fed in pieces (each piece a fresh allocation of exactly its
 *      size, so AddressSanitizer catches any read past what has arrived): the events,
 *      once data chunks are joined into messages, must not depend on the cuts.
 *   3. Every data chunk lies inside the piece it was reported from; a message never
 *      exceeds max_message; a chunk marked `first` starts a message and `last` ends one.
 *   4. Frames rebuilt with ws_frame_header/ws_mask from what the parser reported parse
 *      back to the same events (the writer and the parser agree).
 *
 * Any mismatch aborts.  Built with -DWS_FUZZ_REPLAY it has its own main() that runs the
 * files named on the command line.  Driven by tests/fuzz/run.sh.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ws_frame.h"

#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "ws_fuzz: check failed at line %d: %s\n", __LINE__, #cond); \
            abort();                                                                  \
        }                                                                             \
    } while (0)

#define MAX_EVENTS 4096

typedef struct {
    int type;            /* WS_EV_DATA here means "a whole message" */
    int text;
    unsigned code;
    size_t off, len;     /* into the log's byte store */
} rec_event;

typedef struct {
    rec_event ev[MAX_EVENTS];
    size_t n;
    uint8_t *bytes;
    size_t blen, bcap;
    int failed;          /* an error event ends the log */
    /* the message being joined (control frames may come between its chunks) */
    int in_msg;
    uint8_t *msg;
    size_t mlen, mcap;
} event_log;

static void log_init(event_log *l) {
    memset(l, 0, sizeof(*l));
}

static void log_free(event_log *l) {
    free(l->bytes);
    free(l->msg);
}

static void msg_add(event_log *l, const uint8_t *d, size_t n) {
    if (l->mlen + n > l->mcap) {
        size_t cap = l->mcap ? l->mcap : 256;
        while (cap < l->mlen + n)
            cap *= 2;
        l->msg = realloc(l->msg, cap);
        CHECK(l->msg != NULL);
        l->mcap = cap;
    }
    if (n)
        memcpy(l->msg + l->mlen, d, n);
    l->mlen += n;
}

static size_t log_bytes(event_log *l, const uint8_t *d, size_t n) {
    size_t off = l->blen;
    if (l->blen + n > l->bcap) {
        size_t cap = l->bcap ? l->bcap : 256;
        while (cap < l->blen + n)
            cap *= 2;
        l->bytes = realloc(l->bytes, cap);
        CHECK(l->bytes != NULL);
        l->bcap = cap;
    }
    if (n)
        memcpy(l->bytes + l->blen, d, n);
    l->blen += n;
    return off;
}

static void log_add(event_log *l, int type, int text, unsigned code, size_t off,
                    size_t len) {
    CHECK(l->n < MAX_EVENTS);
    l->ev[l->n].type = type;
    l->ev[l->n].text = text;
    l->ev[l->n].code = code;
    l->ev[l->n].off = off;
    l->ev[l->n].len = len;
    l->n++;
}

/* Record one event of ws_parse (data chunks joined into messages). */
static void log_parser_event(event_log *l, const ws_event *ev, uint64_t max_message) {
    switch (ev->type) {
    case WS_EV_DATA:
        if (ev->first) {
            CHECK(!l->in_msg);
            l->in_msg = 1;
            l->mlen = 0;
        }
        CHECK(l->in_msg);
        msg_add(l, ev->data, ev->len);
        CHECK(max_message == 0 || l->mlen <= max_message);
        if (ev->last) {
            size_t off = log_bytes(l, l->msg, l->mlen);
            log_add(l, WS_EV_DATA, ev->text, 0, off, l->mlen);
            l->in_msg = 0;
        }
        break;
    case WS_EV_PING:
    case WS_EV_PONG:
    case WS_EV_CLOSE: {
        size_t off;
        CHECK(ev->len <= 125);
        off = log_bytes(l, ev->data, ev->len);
        log_add(l, ev->type, 0, ev->type == WS_EV_CLOSE ? ev->code : 0, off, ev->len);
        break;
    }
    case WS_EV_ERROR:
        CHECK(ev->code == 1002 || ev->code == 1007 || ev->code == 1009);
        CHECK(ev->reason != NULL);
        log_add(l, WS_EV_ERROR, 0, ev->code, 0, 0);
        l->failed = 1;
        break;
    default:
        CHECK(0);
    }
}

/* Feed buf (a private copy, written to by the parser) to p; chunks must lie inside it. */
static void feed(ws_parser *p, uint8_t *buf, size_t n, event_log *l, uint64_t max_message) {
    size_t pos = 0;
    while (!l->failed) {
        ws_event ev;
        size_t k = ws_parse(p, buf + pos, n - pos, &ev);
        CHECK(k <= n - pos);
        pos += k;
        if (ev.type == WS_EV_MORE) {
            CHECK(pos == n);
            return;
        }
        if (ev.type == WS_EV_DATA) {
            CHECK(ev.data >= buf && ev.data + ev.len <= buf + n);
            CHECK(ev.len > 0 || ev.last);
            CHECK(!ev.last || (ev.frame_fin && ev.frame_left == 0));
            CHECK(!ev.first || !ev.frame_fin || max_message == 0 ||
                  ev.len + ev.frame_left <= max_message);
        }
        log_parser_event(l, &ev, max_message);
    }
}

/* ---- the reference ------------------------------------------------------------------ */

/* Whether s[0:n] is valid UTF-8 so far (complete: and not cut inside a character),
 * by decoding code points. */
static int ref_utf8_ok(const uint8_t *s, size_t n, int complete) {
    size_t i = 0;
    while (i < n) {
        uint32_t c = s[i], cp;
        size_t len, k;
        if (c < 0x80) {
            i++;
            continue;
        }
        if ((c & 0xE0) == 0xC0) {
            len = 2;
            cp = c & 0x1F;
        } else if ((c & 0xF0) == 0xE0) {
            len = 3;
            cp = c & 0x0F;
        } else if ((c & 0xF8) == 0xF0) {
            len = 4;
            cp = c & 0x07;
        } else {
            return 0;
        }
        for (k = 1; k < len; k++) {
            if (i + k >= n) {
                /* Cut: the prefix must still be able to become a valid character. */
                uint32_t lo_cp, hi_cp;
                size_t j, rest = len - k;
                if (complete)
                    return 0;
                lo_cp = cp;
                hi_cp = cp;
                for (j = 0; j < rest; j++) {
                    lo_cp = lo_cp << 6;
                    hi_cp = (hi_cp << 6) | 0x3F;
                }
                /* Some value in [lo_cp, hi_cp] must be valid for this length. */
                {
                    uint32_t min = len == 2 ? 0x80 : len == 3 ? 0x800 : 0x10000;
                    uint32_t max = len == 2 ? 0x7FF : len == 3 ? 0xFFFF : 0x10FFFF;
                    if (hi_cp < min || lo_cp > max)
                        return 0;
                    /* Only surrogates in range for three bytes: ED A0..BF. */
                    if (len == 3 && lo_cp >= 0xD800 && hi_cp <= 0xDFFF)
                        return 0;
                }
                return 1;
            }
            if ((s[i + k] & 0xC0) != 0x80)
                return 0;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000))
            return 0;
        if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
        i += len;
    }
    return 1;
}

static void reference(const uint8_t *s, size_t n, int server, uint64_t max_message,
                      event_log *l) {
    size_t i = 0;
    int msg_op = 0;
    size_t msg_len = 0;
    while (i < n) {
        uint8_t b0, b1;
        unsigned op, rsv, fin, masked;
        uint64_t len;
        size_t h = 2, k;
        uint8_t key[4] = {0, 0, 0, 0};
        if (n - i < 2)
            return;
        b0 = s[i];
        b1 = s[i + 1];
        fin = b0 >> 7;
        rsv = (b0 >> 4) & 7;
        op = b0 & 15;
        masked = b1 >> 7;
        len = b1 & 127;
        if (len == 126) {
            if (n - i < 4)
                return;
            len = ((uint64_t)s[i + 2] << 8) | s[i + 3];
            h = 4;
        } else if (len == 127) {
            if (n - i < 10)
                return;
            len = 0;
            for (k = 0; k < 8; k++)
                len = len * 256 + s[i + 2 + k];
            h = 10;
        }
        if (masked) {
            if (n - i < h + 4)
                return;
            memcpy(key, s + i + h, 4);
            h += 4;
        }
        /* Header checks, in the order the RFC's sections list them. */
        if (rsv) {
            log_add(l, WS_EV_ERROR, 0, 1002, 0, 0);
            return;
        }
        if ((op > 2 && op < 8) || op > 10) {
            log_add(l, WS_EV_ERROR, 0, 1002, 0, 0);
            return;
        }
        if ((b1 & 127) == 127 && (len >> 63)) {
            log_add(l, WS_EV_ERROR, 0, 1002, 0, 0);
            return;
        }
        if ((int)masked != server) {
            log_add(l, WS_EV_ERROR, 0, 1002, 0, 0);
            return;
        }
        if (op >= 8 && (!fin || len > 125)) {
            log_add(l, WS_EV_ERROR, 0, 1002, 0, 0);
            return;
        }
        if (op == 0 && !msg_op) {
            log_add(l, WS_EV_ERROR, 0, 1002, 0, 0);
            return;
        }
        if ((op == 1 || op == 2) && msg_op) {
            log_add(l, WS_EV_ERROR, 0, 1002, 0, 0);
            return;
        }
        if (op < 8) {
            uint64_t before = op == 0 ? msg_len : 0;
            if (max_message && before + len > max_message) {
                log_add(l, WS_EV_ERROR, 0, 1009, 0, 0);
                return;
            }
        }
        i += h;
        {
            /* The payload (maybe cut short by the end of the stream). */
            size_t avail = (n - i) < len ? (n - i) : (size_t)len;
            uint8_t *plain = malloc(avail ? avail : 1);
            CHECK(plain != NULL);
            for (k = 0; k < avail; k++)
                plain[k] = s[i + k] ^ key[k % 4];
            if (op >= 8) {
                if (avail < len) {
                    free(plain);
                    return;
                }
                if (op == 8) {
                    unsigned code = 1005;
                    size_t off;
                    if (len == 1) {
                        log_add(l, WS_EV_ERROR, 0, 1002, 0, 0);
                        free(plain);
                        return;
                    }
                    if (len >= 2) {
                        code = (unsigned)plain[0] * 256 + plain[1];
                        if (!((code >= 1000 && code <= 1003) ||
                              (code >= 1007 && code <= 1014) ||
                              (code >= 3000 && code <= 4999))) {
                            log_add(l, WS_EV_ERROR, 0, 1002, 0, 0);
                            free(plain);
                            return;
                        }
                        if (!ref_utf8_ok(plain + 2, len - 2, 1)) {
                            log_add(l, WS_EV_ERROR, 0, 1007, 0, 0);
                            free(plain);
                            return;
                        }
                    }
                    off = log_bytes(l, len >= 2 ? plain + 2 : plain, len >= 2 ? len - 2 : 0);
                    log_add(l, WS_EV_CLOSE, 0, code, off, len >= 2 ? len - 2 : 0);
                } else {
                    size_t off = log_bytes(l, plain, len);
                    log_add(l, op == 9 ? WS_EV_PING : WS_EV_PONG, 0, 0, off, len);
                }
                free(plain);
                i += len;
                continue;
            }
            if (op != 0) {
                msg_op = (int)op;
                l->mlen = 0;
            }
            msg_add(l, plain, avail);
            msg_len = l->mlen;
            free(plain);
            if (msg_op == 1 && !ref_utf8_ok(l->msg, l->mlen, avail == len && fin)) {
                log_add(l, WS_EV_ERROR, 0, 1007, 0, 0);
                return;
            }
            if (avail < len)
                return;
            i += len;
            if (fin) {
                size_t off = log_bytes(l, l->msg, l->mlen);
                log_add(l, WS_EV_DATA, msg_op == 1, 0, off, l->mlen);
                msg_op = 0;
            }
        }
    }
}

/* ---- comparing ------------------------------------------------------------------------ */

static void same_logs(const event_log *a, const event_log *b) {
    size_t i;
    CHECK(a->n == b->n);
    for (i = 0; i < a->n; i++) {
        const rec_event *x = &a->ev[i], *y = &b->ev[i];
        CHECK(x->type == y->type);
        CHECK(x->code == y->code);
        CHECK(x->text == y->text);
        CHECK(x->len == y->len);
        CHECK(x->len == 0 || memcmp(a->bytes + x->off, b->bytes + y->off, x->len) == 0);
    }
}

static const uint64_t MAX_MESSAGES[8] = {0, 1, 125, 126, 1000, 65535, 65536, 1 << 20};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    int server;
    uint64_t max_message;
    uint32_t seed;
    const uint8_t *s;
    size_t n, pos;
    uint8_t *copy;
    ws_parser p;
    event_log whole, pieces, ref, rebuilt;
    if (size < 2)
        return 0;
    server = data[0] & 1;
    max_message = MAX_MESSAGES[(data[0] >> 1) & 7];
    seed = data[1] * 2654435761u + 1;
    s = data + 2;
    n = size - 2;

    /* 1. whole, against the reference */
    log_init(&whole);
    copy = malloc(n ? n : 1);
    CHECK(copy != NULL);
    if (n)
        memcpy(copy, s, n);
    ws_parser_init(&p, max_message, server);
    feed(&p, copy, n, &whole, max_message);
    free(copy);
    log_init(&ref);
    reference(s, n, server, max_message, &ref);
    same_logs(&whole, &ref);

    /* 2. in pieces, each its own exact allocation */
    log_init(&pieces);
    ws_parser_init(&p, max_message, server);
    pos = 0;
    while (pos < n && !pieces.failed) {
        size_t k;
        uint8_t *piece;
        seed = seed * 1103515245u + 12345u;
        k = 1 + (seed >> 8) % (n - pos < 64 ? n - pos : 64);
        if ((seed >> 4) % 7 == 0)
            k = n - pos;
        piece = malloc(k);
        CHECK(piece != NULL);
        memcpy(piece, s + pos, k);
        feed(&p, piece, k, &pieces, max_message);
        free(piece);
        pos += k;
    }
    same_logs(&whole, &pieces);

    /* 4. rebuild the good events as frames (masked as a client would) and parse again */
    {
        size_t i, total = 0, at = 0;
        uint8_t *out;
        for (i = 0; i < whole.n; i++)
            total += 14 + 2 + whole.ev[i].len;
        out = malloc(total ? total : 1);
        CHECK(out != NULL);
        for (i = 0; i < whole.n; i++) {
            const rec_event *e = &whole.ev[i];
            uint8_t key[4] = {(uint8_t)(seed >> 3), (uint8_t)(i * 7 + 1), 0x5A,
                              (uint8_t)(seed >> 19)};
            const uint8_t *mask = server ? key : NULL;
            unsigned op;
            uint8_t payload[127];
            const uint8_t *body;
            size_t blen = e->len;
            if (e->type == WS_EV_ERROR)
                break;
            body = whole.bytes != NULL ? whole.bytes + e->off : payload;
            if (e->type == WS_EV_DATA) {
                op = e->text ? WS_OP_TEXT : WS_OP_BINARY;
            } else if (e->type == WS_EV_CLOSE) {
                op = WS_OP_CLOSE;
                if (e->code != 1005) {
                    payload[0] = (uint8_t)(e->code >> 8);
                    payload[1] = (uint8_t)e->code;
                    memcpy(payload + 2, body, blen);
                    body = payload;
                    blen += 2;
                }
            } else {
                op = e->type == WS_EV_PING ? WS_OP_PING : WS_OP_PONG;
            }
            at += ws_frame_header(out + at, op, 1, blen, mask);
            if (mask)
                ws_mask(out + at, body, blen, key, 0);
            else if (blen)
                memcpy(out + at, body, blen);
            at += blen;
        }
        log_init(&rebuilt);
        ws_parser_init(&p, max_message, server);
        feed(&p, out, at, &rebuilt, max_message);
        free(out);
        /* The same events, without the error (which was not rebuilt). */
        if (whole.n && whole.ev[whole.n - 1].type == WS_EV_ERROR) {
            CHECK(rebuilt.n == whole.n - 1);
            whole.n--;
        }
        same_logs(&whole, &rebuilt);
        log_free(&rebuilt);
    }

    /* 3'. the UTF-8 validator against the reference on the raw input */
    {
        ws_utf8 u;
        int ok;
        ws_utf8_init(&u);
        ok = ws_utf8_feed(&u, s, n) == 0;
        CHECK(ok == ref_utf8_ok(s, n, 0));
        CHECK((ok && ws_utf8_complete(&u)) == ref_utf8_ok(s, n, 1));
    }

    log_free(&whole);
    log_free(&pieces);
    log_free(&ref);
    return 0;
}

#ifdef WS_FUZZ_REPLAY
int main(int argc, char **argv) {
    int i;
    for (i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        uint8_t *buf;
        long len;
        CHECK(f != NULL);
        fseek(f, 0, SEEK_END);
        len = ftell(f);
        fseek(f, 0, SEEK_SET);
        buf = malloc(len ? (size_t)len : 1);
        CHECK(buf != NULL);
        CHECK(fread(buf, 1, (size_t)len, f) == (size_t)len);
        fclose(f);
        LLVMFuzzerTestOneInput(buf, (size_t)len);
        free(buf);
    }
    printf("ws_fuzz: %d input(s) replayed, no failure\n", argc - 1);
    return 0;
}
#endif
