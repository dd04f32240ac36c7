/*
 * packet_fuzz.c -- libFuzzer target for the C packet framing (src/iocpnet/port/packet.h)
 * that PacketSession's parse loop and iocpnet.scan_packets both run.
 *
 * Input: two bytes choosing max_size (4..65535, as a session's max_packet_size), one
 * byte choosing how the stream is cut, then the byte stream.  For each input:
 *
 *   1. The stream is framed the way a session does (packet_scan from each packet's
 *      start) and compared with an independent reference written here from the wire
 *      format alone: same packets, same ids, same place and kind of error.
 *   2. The same stream is fed in pieces, each piece appended to a buffer that holds
 *      exactly the bytes received so far (a fresh allocation of exactly that size, so
 *      AddressSanitizer catches a read one byte past what has arrived), consuming whole
 *      packets as a session does: the packets and the error must not depend on the cuts.
 *   3. Every packet found is rebuilt with packet_header(): the header bytes must match.
 *
 * Any mismatch aborts (a crash for libFuzzer).  Built with -DPACKET_FUZZ_REPLAY it has
 * its own main() that runs the files named on the command line, for a compiler without
 * libFuzzer.  Driven by tests/fuzz/run.sh.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "packet.h"

#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "packet_fuzz: check failed at line %d: %s\n", __LINE__, #cond); \
            abort();                                                                  \
        }                                                                             \
    } while (0)

#define MAX_PACKETS 65536

typedef struct {
    size_t offset, size;
    unsigned id;
} found_t;

typedef struct {
    found_t pk[MAX_PACKETS];
    size_t n;            /* packets found */
    size_t consumed;     /* bytes they cover */
    int error;           /* 0, or PACKET_TOO_SMALL / PACKET_TOO_LARGE */
    size_t bad_size;
    unsigned bad_id;
} result_t;

static result_t want, got;

/* The reference: byte arithmetic on the wire format, no shared code with packet.h. */
static void reference(const uint8_t *p, size_t n, size_t max_size, result_t *r) {
    size_t pos = 0;
    r->n = 0;
    r->consumed = 0;
    r->error = 0;
    for (;;) {
        size_t size;
        unsigned id;
        if (n - pos < 4)
            break;
        size = p[pos] + 256u * p[pos + 1];
        id = p[pos + 2] + 256u * p[pos + 3];
        if (size < 4 || size > max_size) {
            r->error = size < 4 ? PACKET_TOO_SMALL : PACKET_TOO_LARGE;
            r->bad_size = size;
            r->bad_id = id;
            break;
        }
        if (n - pos < size)
            break;
        CHECK(r->n < MAX_PACKETS);
        r->pk[r->n].offset = pos;
        r->pk[r->n].size = size;
        r->pk[r->n].id = id;
        r->n++;
        pos += size;
    }
    r->consumed = pos;
}

/* Frame `n` bytes at `p` from `base` on, as PacketSession's loop does; append to r.
 * Returns the bytes consumed, or (size_t)-1 after an error (recorded in r). */
static size_t frame(const uint8_t *p, size_t n, size_t max_size, size_t base, result_t *r) {
    size_t pos = 0;
    for (;;) {
        size_t size = 12345;
        unsigned id = 54321;
        packet_status st = packet_scan(p + pos, n - pos, max_size, &size, &id);
        if (st == PACKET_PARTIAL) {
            if (n - pos >= 4) {
                /* The header is there: size and id are reported, and they are sane. */
                CHECK(size >= 4 && size <= max_size && size > n - pos);
                CHECK(size == (size_t)(p[pos] | (p[pos + 1] << 8)));
            }
            return pos;
        }
        if (st != PACKET_OK) {
            CHECK(st == PACKET_TOO_SMALL || st == PACKET_TOO_LARGE);
            CHECK(n - pos >= 4);
            r->error = st;
            r->bad_size = size;
            r->bad_id = id;
            return (size_t)-1;
        }
        CHECK(size >= 4 && size <= max_size && size <= n - pos && id <= 0xFFFF);
        CHECK(r->n < MAX_PACKETS);
        r->pk[r->n].offset = base + pos;
        r->pk[r->n].size = size;
        r->pk[r->n].id = id;
        r->n++;
        {
            uint8_t hdr[4];
            CHECK(packet_header(hdr, id, size - 4) == size);
            CHECK(memcmp(hdr, p + pos, 4) == 0);
        }
        pos += size;
    }
}

static void same(const result_t *a, const result_t *b) {
    size_t i;
    CHECK(a->n == b->n);
    for (i = 0; i < a->n; i++) {
        CHECK(a->pk[i].offset == b->pk[i].offset);
        CHECK(a->pk[i].size == b->pk[i].size);
        CHECK(a->pk[i].id == b->pk[i].id);
    }
    CHECK(a->error == b->error);
    if (a->error) {
        CHECK(a->bad_size == b->bad_size);
        CHECK(a->bad_id == b->bad_id);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t len) {
    size_t max_size, n, fed, held, start, i, piece;
    const uint8_t *stream;
    unsigned cut_seed;
    uint8_t *buf;
    size_t consumed;

    if (len < 3)
        return 0;
    max_size = 4 + (size_t)(data[0] | (data[1] << 8)) % (PACKET_MAX - 3);  /* 4..65535 */
    cut_seed = data[2];
    stream = data + 3;
    n = len - 3;

    /* 1. The whole stream at once, against the reference. */
    reference(stream, n, max_size, &want);
    got.n = 0;
    got.error = 0;
    consumed = frame(stream, n, max_size, 0, &got);
    same(&want, &got);
    if (!got.error)
        CHECK(consumed == want.consumed);

    /* 2. In pieces: a buffer of exactly the bytes held, grown one piece at a time. */
    got.n = 0;
    got.error = 0;
    buf = NULL;
    held = 0;        /* bytes in buf not yet consumed */
    start = 0;       /* stream offset of buf[0] */
    fed = 0;
    i = 0;
    while (fed < n && !got.error) {
        uint8_t *nb;
        /* Piece sizes from the seed and the stream itself: 1 byte, a few, or a lot. */
        switch ((cut_seed + i * 7 + (fed < n ? stream[fed] : 0)) % 4) {
        case 0: piece = 1; break;
        case 1: piece = 1 + (cut_seed % 5); break;
        case 2: piece = 3 + ((stream[fed] * 131u + i) % 700); break;
        default: piece = n - fed; break;
        }
        if (piece > n - fed)
            piece = n - fed;
        nb = (uint8_t *)malloc(held + piece);
        CHECK(nb != NULL);
        if (held)
            memcpy(nb, buf, held);
        memcpy(nb + held, stream + fed, piece);
        free(buf);
        buf = nb;
        held += piece;
        fed += piece;
        consumed = frame(buf, held, max_size, start, &got);
        if (consumed != (size_t)-1 && consumed > 0) {
            /* Keep only the unconsumed rest, again in an exact-size allocation. */
            uint8_t *rest = held - consumed ? (uint8_t *)malloc(held - consumed) : NULL;
            if (held - consumed) {
                CHECK(rest != NULL);
                memcpy(rest, buf + consumed, held - consumed);
            }
            free(buf);
            buf = rest;
            held -= consumed;
            start += consumed;
        }
        i++;
    }
    free(buf);
    same(&want, &got);
    if (!got.error)
        CHECK(start == want.consumed);
    return 0;
}

#ifdef PACKET_FUZZ_REPLAY
/* Run the inputs named on the command line (files), without libFuzzer. */
int main(int argc, char **argv) {
    int i, runs = 0;
    for (i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        uint8_t *d;
        long sz;
        if (!f) {
            perror(argv[i]);
            return 2;
        }
        fseek(f, 0, SEEK_END);
        sz = ftell(f);
        fseek(f, 0, SEEK_SET);
        d = (uint8_t *)malloc(sz > 0 ? (size_t)sz : 1);
        if (sz > 0 && fread(d, 1, (size_t)sz, f) != (size_t)sz) {
            perror(argv[i]);
            return 2;
        }
        fclose(f);
        LLVMFuzzerTestOneInput(d, (size_t)sz);
        free(d);
        runs++;
    }
    printf("packet_fuzz replay: %d input(s), no failure\n", runs);
    return 0;
}
#endif
