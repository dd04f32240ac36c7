/*
 * Reference epoll echo server: one thread, non-blocking sockets,
 * level-triggered epoll. It is the classic readiness-model baseline the
 * Python servers and iocpnet's epoll backend are compared with.
 *
 * Every connection reads into one shared buffer and echoes from it at once;
 * only the unsent rest of a short send is copied to a buffer of its own (then
 * the connection waits for EPOLLOUT and reads nothing until it drains). A
 * 64 KiB buffer per connection instead spreads the copies over 100 x 64 KiB
 * at 100 connections, colder in the cache than C io_uring's few hot ring
 * buffers: the yardstick would measure that, not epoll.
 *
 * usage: c_epoll_echo PORT     (listens on 127.0.0.1:PORT, prints READY)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUFSZ (64 * 1024)

struct conn {
    int fd;
    uint32_t len, off; /* unsent echo bytes are pend[off, len) */
    uint8_t *pend;     /* NULL unless a send was short */
};

static int ep;
static uint8_t rbuf[BUFSZ]; /* every connection reads here */

static void conn_close(struct conn *c)
{
    close(c->fd); /* also removes it from the epoll set */
    free(c->pend);
    free(c);
}

static void set_events(struct conn *c, uint32_t ev)
{
    struct epoll_event e = {.events = ev, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
}

/* Send buf[0, len). Returns how much was sent, or -1 on error: the socket is
 * full (EAGAIN) at a short count. */
static ssize_t send_all(int fd, const uint8_t *buf, size_t len)
{
    size_t off = 0;
    while (off < len) {
        ssize_t n = send(fd, buf + off, len - off, MSG_NOSIGNAL);
        if (n > 0)
            off += (size_t)n;
        else if (n < 0 && errno == EINTR)
            continue;
        else if (n < 0 && errno == EAGAIN)
            break;
        else
            return -1;
    }
    return (ssize_t)off;
}

/* Send what is pending. Returns 0 when all is written, 1 when the socket is
 * full (caller waits for EPOLLOUT), -1 on error. */
static int flush_pending(struct conn *c)
{
    ssize_t n = send_all(c->fd, c->pend + c->off, c->len - c->off);
    if (n < 0)
        return -1;
    c->off += (uint32_t)n;
    if (c->off < c->len)
        return 1;
    free(c->pend);
    c->pend = NULL;
    c->off = c->len = 0;
    return 0;
}

static void on_readable(struct conn *c)
{
    for (;;) {
        ssize_t n = recv(c->fd, rbuf, BUFSZ, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        if (n <= 0) {
            conn_close(c);
            return;
        }
        ssize_t sent = send_all(c->fd, rbuf, (size_t)n);
        if (sent < 0) {
            conn_close(c);
            return;
        }
        if (sent < n) {
            /* Peer is not reading: keep the rest and stop reading until it
             * drains, which bounds memory to one buffer per connection. */
            c->pend = malloc((size_t)(n - sent));
            if (!c->pend) {
                conn_close(c);
                return;
            }
            memcpy(c->pend, rbuf + sent, (size_t)(n - sent));
            c->off = 0;
            c->len = (uint32_t)(n - sent);
            set_events(c, EPOLLOUT);
            return;
        }
        /* a short read means the socket is drained; skip the extra recv()
         * that would only return EAGAIN */
        if (n < BUFSZ)
            return;
    }
}

static void on_writable(struct conn *c)
{
    int r = flush_pending(c);
    if (r < 0)
        conn_close(c);
    else if (r == 0)
        set_events(c, EPOLLIN);
}

static void on_accept(int lfd)
{
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno != EAGAIN)
                perror("accept4");
            return;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct conn *c = malloc(sizeof *c);
        if (!c) {
            close(fd);
            continue;
        }
        c->fd = fd;
        c->len = c->off = 0;
        c->pend = NULL;
        struct epoll_event e = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e) < 0) {
            perror("epoll_ctl");
            conn_close(c);
        }
    }
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s PORT\n", argv[0]);
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) < 0 || listen(lfd, 1024) < 0) {
        perror("bind/listen");
        return 1;
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    /* the listener is tagged with a NULL pointer; connections with theirs */
    struct epoll_event le = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &le);
    printf("READY\n");
    fflush(stdout);

    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (!c) {
                on_accept(lfd);
                continue;
            }
            uint32_t ev = evs[i].events;
            if (c->len > c->off) {
                if (ev & (EPOLLOUT | EPOLLERR | EPOLLHUP))
                    on_writable(c);
            } else if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                on_readable(c);
            }
        }
    }
}
