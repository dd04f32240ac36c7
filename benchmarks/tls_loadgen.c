/* tls_loadgen.c: a checking TLS echo load generator for benchmarks/tls_echo.py.
 *
 * One thread, OpenSSL over non-blocking sockets and level-triggered epoll.  It opens
 * `-c` connections to 127.0.0.1:PORT, finishes every handshake first (blocking, one
 * after the other: handshakes are not what this measures), then ping-pongs: each
 * connection sends one `-s`-byte message, waits for the whole echo, compares it with
 * what it sent, sends the next.  Message m of connection c is a window of a random
 * buffer chosen by (c, m) with m in its first 8 bytes, so a stale, misrouted or
 * corrupted echo is caught (exit 3).
 *
 * Protocol with the driver (stdout, line by line):
 *   "START"                once the warm-up (-w seconds) is over and the window opens
 *   "END {json}"           when the window (-d seconds) closes: round trips, latency
 *                          percentiles and this process's CPU seconds in the window
 * then it waits for its stdin to close (the driver reads the server's CPU meanwhile)
 * and exits without tearing the connections down politely.
 *
 * Only 127.0.0.0/8: it is a benchmark tool, not a load-testing tool.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define NBUCKETS 1024            /* log2(us) * 32: 2 % wide buckets up to ~2^32 us */

typedef struct {
    int fd;
    SSL *ssl;
    uint64_t msg;                /* messages sent */
    const unsigned char *expect; /* the message in flight */
    size_t got;                  /* bytes of its echo received */
    unsigned char *rbuf;
    int want_write;              /* SSL_write returned WANT_WRITE: retry on EPOLLOUT */
    double sent_at;
} conn_t;

static size_t msg_size;
static unsigned char *pattern;   /* msg_size + 4096 random bytes */
static uint64_t hist[NBUCKETS];
static uint64_t round_trips;
static int in_window;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
           ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static void die(const char *what) {
    fprintf(stderr, "tls_loadgen: %s: %s\n", what, strerror(errno));
    ERR_print_errors_fp(stderr);
    exit(2);
}

/* Message m of connection c, built into the connection's own copy (expect points at
 * it): a window of the random pattern, the counter in its first 8 bytes. */
static void build(conn_t *k, size_t index) {
    unsigned char *m = k->rbuf + msg_size;          /* second half of rbuf */
    size_t off = (index * 7919 + k->msg * 104729) % 4096;
    memcpy(m, pattern + off, msg_size);
    if (msg_size >= 8)
        memcpy(m, &k->msg, 8);
    k->expect = m;
}

static int send_msg(conn_t *k) {
    int n = SSL_write(k->ssl, k->expect, (int)msg_size);
    if (n > 0) {
        k->want_write = 0;
        return 0;
    }
    int err = SSL_get_error(k->ssl, n);
    if (err == SSL_ERROR_WANT_WRITE || err == SSL_ERROR_WANT_READ) {
        k->want_write = 1;
        return 1;
    }
    fprintf(stderr, "tls_loadgen: SSL_write failed (%d)\n", err);
    ERR_print_errors_fp(stderr);
    exit(2);
}

int main(int argc, char **argv) {
    int port = 0, nconn = 1, opt, version = 13;
    double warm = 0.3, dur = 1.0;
    msg_size = 64;
    while ((opt = getopt(argc, argv, "p:c:s:w:d:v:")) != -1) {
        switch (opt) {
        case 'p': port = atoi(optarg); break;
        case 'c': nconn = atoi(optarg); break;
        case 's': msg_size = (size_t)atol(optarg); break;
        case 'w': warm = atof(optarg); break;
        case 'd': dur = atof(optarg); break;
        case 'v': version = atoi(optarg); break;
        default:
            fprintf(stderr, "usage: tls_loadgen -p PORT [-c CONNS] [-s SIZE] [-w WARMUP] "
                            "[-d SECONDS] [-v 12|13]\n");
            return 2;
        }
    }
    if (port <= 0 || nconn <= 0 || msg_size == 0) {
        fprintf(stderr, "tls_loadgen: bad arguments\n");
        return 2;
    }
    pattern = malloc(msg_size + 4096);
    if (!pattern)
        die("malloc");
    FILE *ur = fopen("/dev/urandom", "rb");
    if (!ur || fread(pattern, 1, msg_size + 4096, ur) != msg_size + 4096)
        die("/dev/urandom");
    fclose(ur);

    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx)
        die("SSL_CTX_new");
    int v = version == 12 ? TLS1_2_VERSION : TLS1_3_VERSION;
    SSL_CTX_set_min_proto_version(ctx, v);
    SSL_CTX_set_max_proto_version(ctx, v);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);   /* a benchmark on loopback */
    SSL_CTX_set_mode(ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);

    conn_t *conns = calloc((size_t)nconn, sizeof(conn_t));
    int ep = epoll_create1(0);
    if (!conns || ep < 0)
        die("setup");
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    for (int i = 0; i < nconn; i++) {
        conn_t *k = &conns[i];
        k->fd = socket(AF_INET, SOCK_STREAM, 0);
        if (k->fd < 0 || connect(k->fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
            die("connect");
        int one = 1;
        setsockopt(k->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        k->ssl = SSL_new(ctx);
        SSL_set_fd(k->ssl, k->fd);
        SSL_set_tlsext_host_name(k->ssl, "localhost");
        if (SSL_connect(k->ssl) != 1)
            die("TLS handshake");
        fcntl(k->fd, F_SETFL, fcntl(k->fd, F_GETFL) | O_NONBLOCK);
        k->rbuf = malloc(2 * msg_size);
        if (!k->rbuf)
            die("malloc");
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, k->fd, &ev) < 0)
            die("epoll_ctl");
    }

    double start = now_s();
    double window_start = start + warm, window_end = window_start + dur;
    double cpu0 = 0, cpu1 = 0, t0 = 0, t1 = 0;
    for (int i = 0; i < nconn; i++) {
        conns[i].msg = 1;
        build(&conns[i], (size_t)i);
        conns[i].sent_at = now_s();
        send_msg(&conns[i]);
    }
    struct epoll_event evs[256];
    for (;;) {
        double t = now_s();
        if (!in_window && t >= window_start) {
            in_window = 1;
            t0 = t;
            /* the window is -d seconds from when it opens: a pass that overran the
             * warm-up (a descheduled process, slow handshakes) cannot close it at once */
            window_end = t0 + dur;
            cpu0 = cpu_s();
            printf("START\n");
            fflush(stdout);
        }
        if (in_window && t >= window_end) {
            t1 = t;
            cpu1 = cpu_s();
            break;
        }
        int n = epoll_wait(ep, evs, 256, 10);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        for (int e = 0; e < n; e++) {
            conn_t *k = &conns[evs[e].data.u32];
            size_t idx = evs[e].data.u32;
            if (k->want_write && (evs[e].events & EPOLLOUT)) {
                if (send_msg(k) == 0) {
                    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)idx};
                    epoll_ctl(ep, EPOLL_CTL_MOD, k->fd, &ev);
                }
            }
            for (;;) {
                int r = SSL_read(k->ssl, k->rbuf + k->got, (int)(msg_size - k->got));
                if (r <= 0) {
                    int err = SSL_get_error(k->ssl, r);
                    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE)
                        break;
                    fprintf(stderr, "tls_loadgen: connection %zu: SSL_read failed (%d) "
                                    "after %llu messages\n", idx, err,
                            (unsigned long long)k->msg);
                    ERR_print_errors_fp(stderr);
                    return 2;
                }
                k->got += (size_t)r;
                if (k->got < msg_size)
                    continue;
                if (memcmp(k->rbuf, k->expect, msg_size) != 0) {
                    fprintf(stderr, "tls_loadgen: connection %zu: echo %llu differs\n",
                            idx, (unsigned long long)k->msg);
                    return 3;
                }
                double done = now_s();
                if (in_window) {
                    double us = (done - k->sent_at) * 1e6;
                    int b = us >= 1 ? (int)(log2(us) * 32) : 0;
                    if (b >= NBUCKETS)
                        b = NBUCKETS - 1;
                    hist[b]++;
                    round_trips++;
                }
                k->got = 0;
                k->msg++;
                build(k, idx);
                k->sent_at = done;
                if (send_msg(k)) {
                    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT,
                                             .data.u32 = (uint32_t)idx};
                    epoll_ctl(ep, EPOLL_CTL_MOD, k->fd, &ev);
                    break;
                }
            }
        }
    }
    double pct[3] = {50, 99, 99.9}, val[3] = {0, 0, 0};
    for (int q = 0; q < 3; q++) {
        uint64_t rank = (uint64_t)ceil(pct[q] / 100.0 * (double)round_trips), seen = 0;
        for (int b = 0; b < NBUCKETS && round_trips; b++) {
            seen += hist[b];
            if (seen >= rank) {
                val[q] = pow(2.0, (b + 1) / 32.0);
                break;
            }
        }
    }
    printf("END {\"round_trips\": %llu, \"seconds\": %.6f, \"cpu_seconds\": %.6f, "
           "\"p50_us\": %.1f, \"p99_us\": %.1f, \"p999_us\": %.1f}\n",
           (unsigned long long)round_trips, t1 - t0, cpu1 - cpu0, val[0], val[1], val[2]);
    fflush(stdout);
    char c;
    while (read(0, &c, 1) > 0)
        ;
    return 0;
}
