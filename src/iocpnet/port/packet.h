/*
 * packet.h -- the packet framing of PacketSession, in plain C so that the same code is
 * used by the Cython parse loop and driven directly by the fuzzer (tests/fuzz/).
 *
 * A packet is [size: u16 little-endian][id: u16 little-endian][payload], where size
 * counts the 4-byte header.  Nothing here allocates or touches Python.
 */
#ifndef IOCPNET_PACKET_H
#define IOCPNET_PACKET_H

#include <stddef.h>
#include <stdint.h>

#define PACKET_HEADER 4
#define PACKET_MAX 0xFFFF

typedef enum packet_status {
    PACKET_OK = 0,         /* a whole packet: *size and *id are set */
    PACKET_PARTIAL = 1,    /* not enough bytes yet for the header or the whole packet */
    PACKET_TOO_SMALL = -1, /* the announced size is below the header's 4 bytes */
    PACKET_TOO_LARGE = -2  /* the announced size is above the session's limit */
} packet_status;

/* Look at the packet starting at p (n bytes available).  On PACKET_OK the packet is
 * p[0:*size] with its payload at p[4:*size].  On PACKET_PARTIAL with n >= 4, *size and
 * *id are set too (the packet announced so far); on an error they say what was bad. */
static inline packet_status packet_scan(const uint8_t *p, size_t n, size_t max_size,
                                        size_t *size, unsigned *id) {
    size_t s;
    if (n < PACKET_HEADER)
        return PACKET_PARTIAL;
    s = (size_t)p[0] | ((size_t)p[1] << 8);
    *size = s;
    *id = (unsigned)p[2] | ((unsigned)p[3] << 8);
    if (s < PACKET_HEADER)
        return PACKET_TOO_SMALL;
    if (s > max_size)
        return PACKET_TOO_LARGE;
    if (n < s)
        return PACKET_PARTIAL;
    return PACKET_OK;
}

/* Write a header for a payload of payload_len bytes into out[0:4]; returns the packet's
 * total size, or 0 if it does not fit in a packet. */
static inline size_t packet_header(uint8_t *out, unsigned id, size_t payload_len) {
    size_t s = payload_len + PACKET_HEADER;
    if (s > PACKET_MAX || id > 0xFFFF)
        return 0;
    out[0] = (uint8_t)(s & 0xFF);
    out[1] = (uint8_t)(s >> 8);
    out[2] = (uint8_t)(id & 0xFF);
    out[3] = (uint8_t)(id >> 8);
    return s;
}

#endif /* IOCPNET_PACKET_H */
