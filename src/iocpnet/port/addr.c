/*
 * addr.c -- socket addresses, the same on every platform: resolving a host and port
 * (port_resolve) and showing an address as text (port_addr_format).  The few platform
 * differences (how a socket is probed for, where the last error is) are spelled out
 * below; nothing here depends on the backend, and nothing waits except getaddrinfo on a
 * name that is not numeric.  No state, no locks.
 */
#include "port_int.h"

#include <stdio.h>
#include <string.h>

#ifdef _WIN32
#  define LAST_ERROR() port_err_from_os(WSAGetLastError())
#  define NTOP_LEN(n) (n)
#else
#  include <arpa/inet.h>
#  include <errno.h>
#  include <netdb.h>
#  include <unistd.h>
#  define LAST_ERROR() port_err_from_os(errno)
#  define NTOP_LEN(n) ((socklen_t)(n))
#endif

/* Can this host make IPv6 sockets? */
static int have_ipv6(void) {
#ifdef _WIN32
    SOCKET s = WSASocketW(AF_INET6, SOCK_STREAM, IPPROTO_TCP, NULL, 0, 0);
    if (s == INVALID_SOCKET)
        return 0;
    closesocket(s);
#else
    int s = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return 0;
    close(s);
#endif
    return 1;
}

int port_resolve(const char *host, int portnum, int passive, port_addr_t *out) {
    struct addrinfo hints, *res = NULL;
    char service[16];
    int rc;

    if (portnum < 0 || portnum > 65535)
        return PORT_EINVAL;
#ifdef _WIN32
    rc = port__win_init();
    if (rc != 0 && rc != PORT_EUNAVAIL)
        return rc;
#endif
    memset(out, 0, sizeof(*out));
    if (host == NULL || host[0] == '\0') {
        if (!passive)
            return PORT_EINVAL;
        /* "All interfaces": an IPv6 wildcard that also takes IPv4 (dual stack: each
         * backend's listen clears IPV6_V6ONLY) where the host has IPv6, else the IPv4
         * wildcard. */
        if (have_ipv6()) {
            struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&out->ss;
            a6->sin6_family = AF_INET6;
            a6->sin6_addr = in6addr_any;
            a6->sin6_port = htons((uint16_t)portnum);
            out->len = (int)sizeof(*a6);
        } else {
            struct sockaddr_in *a4 = (struct sockaddr_in *)&out->ss;
            a4->sin_family = AF_INET;
            a4->sin_addr.s_addr = htonl(INADDR_ANY);
            a4->sin_port = htons((uint16_t)portnum);
            out->len = (int)sizeof(*a4);
        }
        return 0;
    }
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_protocol = IPPROTO_TCP;
    hints.ai_flags = passive ? AI_PASSIVE : 0;
    snprintf(service, sizeof(service), "%d", portnum);
    rc = getaddrinfo(host, service, &hints, &res);
    if (rc != 0) {
#ifdef EAI_SYSTEM
        if (rc == EAI_SYSTEM)
            return port_err_from_os(errno);
#endif
        /* (On Windows getaddrinfo's EAI_* codes are WSA codes.) */
        if (rc == EAI_MEMORY)
            return PORT_ENOMEM;
        if (rc == EAI_FAMILY)
            return PORT_EAFNOSUPPORT;
        return PORT_ENONAME;
    }
    if (res == NULL || res->ai_addrlen > sizeof(out->ss)) {
        if (res)
            freeaddrinfo(res);
        return PORT_ENONAME;
    }
    memcpy(&out->ss, res->ai_addr, res->ai_addrlen);
    out->len = (int)res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

static int is_v4mapped(const struct in6_addr *a) {
    static const unsigned char prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    return memcmp(a->s6_addr, prefix, sizeof(prefix)) == 0;
}

int port_addr_format(const port_addr_t *addr, char *host, size_t hostlen, int *portnum) {
    if (addr->ss.ss_family == AF_INET) {
        const struct sockaddr_in *a4 = (const struct sockaddr_in *)&addr->ss;
        if (inet_ntop(AF_INET, (void *)&a4->sin_addr, host, NTOP_LEN(hostlen)) == NULL)
            return LAST_ERROR();
        *portnum = ntohs(a4->sin_port);
        return 0;
    }
    if (addr->ss.ss_family == AF_INET6) {
        const struct sockaddr_in6 *a6 = (const struct sockaddr_in6 *)&addr->ss;
        /* A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d; show them as IPv4,
         * which is what the user connected with. */
        if (is_v4mapped(&a6->sin6_addr)) {
            if (inet_ntop(AF_INET, (void *)&a6->sin6_addr.s6_addr[12], host,
                          NTOP_LEN(hostlen)) == NULL)
                return LAST_ERROR();
        } else if (inet_ntop(AF_INET6, (void *)&a6->sin6_addr, host, NTOP_LEN(hostlen)) == NULL) {
            return LAST_ERROR();
        }
        *portnum = ntohs(a6->sin6_port);
        return 0;
    }
    return PORT_EAFNOSUPPORT;
}
