/*
 * posix_sock.c -- socket helpers shared by the POSIX backends (io_uring and epoll):
 * errno mapping, listening sockets, close, sendmsg, socket queries.  Nothing here waits
 * and nothing keeps state.  (Name resolution and address text: addr.c.)
 */
#ifndef _WIN32
#include "port_int.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/tcp.h>
#include <limits.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>
#ifdef __linux__
#  include <linux/sockios.h>
#endif

#ifndef IOV_MAX
#  define IOV_MAX 1024
#endif

int port_err_from_os(int e) {
    switch (e) {
    case 0: return PORT_OK;
    case ECANCELED: return PORT_ECANCELED;
    case ECONNRESET: return PORT_ECONNRESET;
    case ECONNREFUSED: return PORT_ECONNREFUSED;
    case ECONNABORTED: return PORT_ECONNABORTED;
    case ETIMEDOUT: return PORT_ETIMEDOUT;
    case EPIPE: return PORT_EPIPE;
    case ENOTCONN: return PORT_ENOTCONN;
    case ENETUNREACH: return PORT_ENETUNREACH;
    case EHOSTUNREACH: return PORT_EHOSTUNREACH;
    case ENETDOWN: return PORT_ENETDOWN;
    case EADDRINUSE: return PORT_EADDRINUSE;
    case EADDRNOTAVAIL: return PORT_EADDRNOTAVAIL;
    case EAFNOSUPPORT: return PORT_EAFNOSUPPORT;
    case EMFILE: return PORT_EMFILE;
    case ENFILE: return PORT_ENFILE;
    case ENOBUFS: return PORT_ENOBUFS;
    case ENOMEM: return PORT_ENOMEM;
    case EINVAL: return PORT_EINVAL;
    case EBADF: case ENOTSOCK: return PORT_EBADF;
#if EWOULDBLOCK != EAGAIN
    case EWOULDBLOCK:
#endif
    case EAGAIN: return PORT_EAGAIN;
    case EACCES: return PORT_EACCES;
    case EPERM: return PORT_EPERM;
    case ENOSYS: return PORT_ENOSYS;
    case EBUSY: return PORT_EBUSY;
    case EIO: return PORT_EIO;
    case EINTR: return PORT_EINTR;
    case EMSGSIZE: return PORT_EMSGSIZE;
    case EOPNOTSUPP: return PORT_EOPNOTSUPP;
    case EFAULT: return PORT_EFAULT;
    case EISCONN: return PORT_EISCONN;
    case EALREADY: return PORT_EALREADY;
    case EINPROGRESS: return PORT_EINPROGRESS;
    case EDESTADDRREQ: return PORT_EDESTADDRREQ;
    case EPROTONOSUPPORT: case ESOCKTNOSUPPORT: return PORT_EPROTONOSUPPORT;
    case EPROTOTYPE: return PORT_EPROTOTYPE;
    case ENOPROTOOPT: return PORT_ENOPROTOOPT;
    /* The kernel reports a peer that vanished mid-connect or a dead route this way. */
    case EHOSTDOWN: return PORT_EHOSTUNREACH;
    case ENONET: return PORT_ENETUNREACH;
    case EPROTO: return PORT_ECONNABORTED;
    /* As Winsock's twins read (win_sock.c): keep-alive found the connection dead; a
     * send after shutdown; io_uring's own timeout code. */
    case ENETRESET: return PORT_ECONNRESET;
    case ESHUTDOWN: return PORT_EPIPE;
#ifdef ETIME
    case ETIME: return PORT_ETIMEDOUT;
#endif
    }
    return PORT_EUNKNOWN;
}

int port__posix_listen_socket(const port_addr_t *addr, int backlog, int flags, int *out) {
    int fd, one = 1, e;
    int family = addr->ss.ss_family;

    fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
    if (fd < 0)
        return port_err_from_os(errno);
    /* SO_REUSEADDR so a restarted server binds at once despite TIME_WAIT sockets. */
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0)
        goto fail;
#ifdef SO_REUSEPORT
    if ((flags & PORT_LISTEN_REUSEPORT) &&
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) < 0)
        goto fail;
#else
    if (flags & PORT_LISTEN_REUSEPORT) {
        close(fd);
        return PORT_EOPNOTSUPP;
    }
#endif
    if (family == AF_INET6) {
        int v6only = (flags & PORT_LISTEN_V6ONLY) ? 1 : 0;
        if (setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof(v6only)) < 0)
            goto fail;
    }
    /* Accepted sockets inherit it (Linux, the BSDs): port.h's TCP_NODELAY on every
     * accepted socket without a setsockopt per connection. */
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0)
        goto fail;
    if (bind(fd, (const struct sockaddr *)&addr->ss, (socklen_t)addr->len) < 0)
        goto fail;
    if (listen(fd, backlog) < 0)
        goto fail;
    *out = fd;
    return 0;
fail:
    e = errno;
    close(fd);
    return port_err_from_os(e);
}

int port__posix_close(int fd, int flags) {
    if (fd < 0)
        return PORT_EBADF;
    if (flags & PORT_CLOSE_RESET) {
        /* Linger with a zero timeout: close() discards unsent data and sends a reset. */
        struct linger lg;
        lg.l_onoff = 1;
        lg.l_linger = 0;
        (void)setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    }
    /* Linux always releases the descriptor, even when close() reports EINTR. */
    if (close(fd) < 0 && errno != EINTR)
        return port_err_from_os(errno);
    return 0;
}

long port__posix_sendmsg(int fd, const port_buf_t *bufs, int nbufs) {
    struct msghdr m;
    ssize_t r;
    if (nbufs == 1) {
        /* A reply is one buffer: send(2) spares the kernel copying in a msghdr and an
         * iovec array for it. */
        do
            r = port__sys_send(fd, bufs[0].base, bufs[0].len, MSG_NOSIGNAL | MSG_DONTWAIT);
        while (r < 0 && errno == EINTR);
        return (long)r;
    }
    memset(&m, 0, sizeof(m));
    m.msg_iov = (struct iovec *)(void *)bufs;
    /* Past IOV_MAX the kernel refuses the whole call; sending the first IOV_MAX buffers
     * is a partial send, which port.h allows (the caller continues from there). */
    m.msg_iovlen = (size_t)(nbufs > IOV_MAX ? IOV_MAX : nbufs);
    do
        r = port__sys_sendmsg(fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
    while (r < 0 && errno == EINTR);
    return (long)r;
}

int64_t port__posix_port_send_now(port_t *p, port_sock_t sock, const port_buf_t *bufs,
                                  int nbufs) {
    PORT_UNUSED(p);
    return port__posix_send_now_inline(sock, bufs, nbufs);
}

int port_sockname(port_sock_t s, port_addr_t *out) {
    socklen_t len = sizeof(out->ss);
    if (getsockname(s, (struct sockaddr *)&out->ss, &len) < 0)
        return port_err_from_os(errno);
    out->len = (int)len;
    return 0;
}

int port_peername(port_sock_t s, port_addr_t *out) {
    socklen_t len = sizeof(out->ss);
    int err;
    if (getpeername(s, (struct sockaddr *)&out->ss, &len) == 0) {
        out->len = (int)len;
        return 0;
    }
    err = errno;
#if defined(__linux__) && defined(SO_PEERNAME)
    /* A TCP peer that has reset: getpeername says ENOTCONN, but the socket still holds
     * the address, and SO_PEERNAME reads it in any state (a connection accepted with no
     * address, a multishot accept's, is told apart by it: the per-address limits).  It
     * wants the address's own length, no more: IPv6 first, then IPv4. */
    if (err == ENOTCONN) {
        static const socklen_t lens[] = {sizeof(struct sockaddr_in6),
                                         sizeof(struct sockaddr_in)};
        size_t k;
        for (k = 0; k < sizeof(lens) / sizeof(lens[0]); k++) {
            len = lens[k];
            if (getsockopt(s, SOL_SOCKET, SO_PEERNAME, &out->ss, &len) == 0 &&
                    len == lens[k] && ((struct sockaddr *)&out->ss)->sa_family ==
                    (k == 0 ? AF_INET6 : AF_INET)) {
                out->len = (int)len;
                return 0;
            }
        }
    }
#endif
    return port_err_from_os(err);
}

int port_set_nodelay(port_sock_t s, int on) {
    if (setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on)) < 0)
        return port_err_from_os(errno);
    return 0;
}

int64_t port_sock_drain(port_sock_t s) {
    char buf[16384];
    int64_t total = 0;
    while (total < ((int64_t)256 << 10)) {
        ssize_t n = recv(s, buf, sizeof(buf), MSG_DONTWAIT);
        if (n > 0) {
            total += n;
            continue;
        }
        if (n == 0 || errno == EAGAIN || errno == EWOULDBLOCK)
            break;                /* the peer's FIN, or nothing more for now */
        if (errno == EINTR)
            continue;
        return total > 0 ? total : port_err_from_os(errno);
    }
    return total;
}

int port_sock_send_progress(port_sock_t s, uint64_t *mark) {
    int n = 0;
#if defined(SIOCOUTQ)
    /* Bytes in the send queue not yet acknowledged: a zero-window probe carries no new
     * data, so it stays put while the peer reads nothing. */
    if (ioctl(s, SIOCOUTQ, &n) < 0)
        return port_err_from_os(errno);
#elif defined(FIONWRITE)
    if (ioctl(s, FIONWRITE, &n) < 0)      /* FreeBSD: the same figure */
        return port_err_from_os(errno);
#elif defined(SO_NWRITE)
    socklen_t len = sizeof(n);             /* macOS: the same figure */
    if (getsockopt(s, SOL_SOCKET, SO_NWRITE, &n, &len) < 0)
        return port_err_from_os(errno);
#else
    (void)s;
    (void)mark;
    return PORT_EOPNOTSUPP;
#endif
    *mark = (uint64_t)(unsigned)n;
    return 0;
}
#endif /* !_WIN32 */
