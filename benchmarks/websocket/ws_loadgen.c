/*
 * ws_loadgen: a WebSocket echo load generator for benchmarks/websocket/run.py.
 *
 * One thread (the caller pins it to a core of its own), -c connections, each doing the
 * HTTP upgrade and then ping-pong: one masked binary message of -s bytes in flight,
 * the echo read whole and compared byte for byte, the next one sent.  Non-blocking
 * sockets and epoll_wait with a zero timeout in a loop (it never sleeps, so it is
 * ready the moment an echo lands); every pass is timed and a pass that found nothing
 * counts as idle, so "busy" says how much of its core it needed: near 1.0 it was the
 * limit of the cell, not the server.
 *
 * Message content depends on (connection, message number): a stale or misrouted echo
 * is a mismatch (exit 3), never a counted round trip.
 *
 * Output: "start" on stdout when the measured window opens (after -w seconds of
 * warm-up), then one JSON line when it closes:
 *   {"round_trips": N, "seconds": T, "busy": B}
 * Usage: ws_loadgen -p PORT [-H 127.0.0.1] [-c 1] [-s 64] [-t 5] [-w 1]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct conn {
    int fd;
    uint64_t seq;
    uint8_t *out;          /* the frame being sent */
    size_t out_len, out_off;
    uint8_t *in;           /* the echo being read: header + payload */
    size_t in_len, in_need;
    uint8_t *expect;       /* the payload we sent */
} conn;

static size_t msg_size = 64;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void fill(conn *c) {
    /* payload: the sequence number, then bytes derived from it and the fd */
    size_t i, h = 2;
    uint8_t *p;
    uint8_t mask[4] = {(uint8_t)(c->seq * 7 + 1), 0x5A, (uint8_t)c->fd, (uint8_t)(c->seq >> 3)};
    for (i = 0; i < msg_size; i++)
        c->expect[i] = (uint8_t)(i < 8 ? (c->seq >> (8 * i)) : (i * 31 + c->fd + c->seq));
    c->out[0] = 0x82;
    if (msg_size < 126) {
        c->out[1] = (uint8_t)(0x80 | msg_size);
    } else {
        c->out[1] = 0x80 | 126;
        c->out[2] = (uint8_t)(msg_size >> 8);
        c->out[3] = (uint8_t)msg_size;
        h = 4;
    }
    memcpy(c->out + h, mask, 4);
    p = c->out + h + 4;
    for (i = 0; i < msg_size; i++)
        p[i] = c->expect[i] ^ mask[i & 3];
    c->out_len = h + 4 + msg_size;
    c->out_off = 0;
    c->in_len = 0;
    c->in_need = (msg_size < 126 ? 2 : 4) + msg_size;
}

static int flush_out(conn *c) {
    while (c->out_off < c->out_len) {
        ssize_t k = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EAGAIN)
                return 0;
            die("send");
        }
        c->out_off += (size_t)k;
    }
    return 1;
}

static void handshake(int fd, const char *host, int port) {
    char req[512], buf[4096];
    size_t got = 0;
    int n = snprintf(req, sizeof req,
                     "GET / HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n", host, port);
    if (send(fd, req, (size_t)n, MSG_NOSIGNAL) != n)
        die("send handshake");
    while (got < sizeof buf - 1) {
        ssize_t k = recv(fd, buf + got, sizeof buf - 1 - got, 0);
        if (k <= 0)
            die("recv handshake");
        got += (size_t)k;
        buf[got] = 0;
        if (strstr(buf, "\r\n\r\n"))
            break;
    }
    if (strncmp(buf, "HTTP/1.1 101", 12) != 0 ||
        !strstr(buf, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")) {
        fprintf(stderr, "ws_loadgen: bad handshake answer: %.200s\n", buf);
        exit(2);
    }
    if (strstr(buf, "\r\n\r\n") + 4 != buf + got) {
        fprintf(stderr, "ws_loadgen: bytes after the handshake answer\n");
        exit(2);
    }
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    int port = 0, nconn = 1, opt, ep, i;
    double seconds = 5, warmup = 1, t0, t_start = 0, t_end, idle = 0;
    uint64_t trips = 0, counted_from = 0;
    int started = 0;
    conn *cs;
    struct epoll_event evs[256];
    while ((opt = getopt(argc, argv, "H:p:c:s:t:w:")) != -1) {
        switch (opt) {
        case 'H': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'c': nconn = atoi(optarg); break;
        case 's': msg_size = (size_t)atol(optarg); break;
        case 't': seconds = atof(optarg); break;
        case 'w': warmup = atof(optarg); break;
        default: return 1;
        }
    }
    if (!port || nconn < 1 || msg_size < 8 || msg_size > 65535) {
        fprintf(stderr, "usage: ws_loadgen -p PORT [-H host] [-c conns] [-s 8..65535] "
                        "[-t seconds] [-w warmup]\n");
        return 1;
    }
    ep = epoll_create1(0);
    cs = calloc((size_t)nconn, sizeof(conn));
    for (i = 0; i < nconn; i++) {
        struct sockaddr_in a;
        int one = 1;
        struct epoll_event ev;
        conn *c = &cs[i];
        c->fd = socket(AF_INET, SOCK_STREAM, 0);
        memset(&a, 0, sizeof a);
        a.sin_family = AF_INET;
        a.sin_port = htons((uint16_t)port);
        inet_pton(AF_INET, host, &a.sin_addr);
        if (connect(c->fd, (struct sockaddr *)&a, sizeof a) != 0)
            die("connect");
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        handshake(c->fd, host, port);
        fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
        c->out = malloc(msg_size + 14);
        c->in = malloc(msg_size + 14);
        c->expect = malloc(msg_size);
        ev.events = EPOLLIN | EPOLLOUT | EPOLLET;
        ev.data.u32 = (uint32_t)i;
        if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) != 0)
            die("epoll_ctl");
        c->seq = 1;
        fill(c);
        flush_out(c);
    }
    t0 = now();
    for (;;) {
        double ts = now(), te;
        int n = epoll_wait(ep, evs, 256, 0), work = 0;
        if (!started && ts - t0 >= warmup) {
            started = 1;
            t_start = ts;
            counted_from = trips;
            idle = 0;
            printf("start\n");
            fflush(stdout);
        }
        if (started && ts - t_start >= seconds)
            break;
        for (i = 0; i < n; i++) {
            conn *c = &cs[evs[i].data.u32];
            work = 1;
            if (evs[i].events & (EPOLLERR | EPOLLHUP)) {
                fprintf(stderr, "ws_loadgen: connection %u closed by the server\n",
                        evs[i].data.u32);
                return 2;
            }
            if (c->out_off < c->out_len)
                flush_out(c);
            for (;;) {
                ssize_t k = recv(c->fd, c->in + c->in_len, c->in_need - c->in_len, 0);
                if (k < 0) {
                    if (errno == EAGAIN)
                        break;
                    die("recv");
                }
                if (k == 0) {
                    fprintf(stderr, "ws_loadgen: EOF from the server\n");
                    return 2;
                }
                c->in_len += (size_t)k;
                if (c->in_len < c->in_need)
                    continue;
                {
                    size_t h = msg_size < 126 ? 2 : 4;
                    if (c->in[0] != 0x82 || memcmp(c->in + h, c->expect, msg_size) != 0) {
                        fprintf(stderr, "ws_loadgen: echo mismatch on connection %d\n",
                                (int)(c - cs));
                        return 3;
                    }
                }
                trips++;
                c->seq++;
                fill(c);
                flush_out(c);
            }
        }
        te = now();
        if (!work && started)
            idle += te - ts;
    }
    t_end = now();
    printf("{\"round_trips\": %llu, \"seconds\": %.4f, \"busy\": %.3f}\n",
           (unsigned long long)(trips - counted_from), t_end - t_start,
           1.0 - idle / (t_end - t_start));
    fflush(stdout);
    return 0;
}
