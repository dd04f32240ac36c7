/*
 * win_sock.c -- socket helpers for the Windows backend (the twin of posix_sock.c):
 * Winsock start-up, error mapping, listening sockets, close, socket queries, and the
 * Microsoft extension functions (AcceptEx, ConnectEx) that iocp.c calls.  Nothing here
 * waits.  (Name resolution and address text: addr.c.)  State: the extension functions,
 * looked up once under an INIT_ONCE and read-only after.
 *
 * Error codes.  Windows reports socket errors in three vocabularies: WSA codes from
 * Winsock calls (WSAECONNRESET), Win32 codes from GetLastError (ERROR_NETNAME_DELETED,
 * ERROR_CONNECTION_REFUSED) and NTSTATUS values left in OVERLAPPED.Internal by a
 * completed I/O (STATUS_CONNECTION_RESET).  port_err_from_os takes the first two; iocp.c
 * turns an NTSTATUS into one of them first.  Each maps to the PORT_E* code that Linux's
 * errno for the same event maps to, so a peer reset is PORT_ECONNRESET everywhere.
 */
#ifdef _WIN32
#include "port_int.h"

#include <mswsock.h>

#ifdef _MSC_VER
#  pragma comment(lib, "ws2_32.lib")   /* the build need not name it (mingw: -lws2_32) */
#endif

#ifndef WSA_FLAG_NO_HANDLE_INHERIT
#  define WSA_FLAG_NO_HANDLE_INHERIT 0x80
#endif
#ifndef ERROR_HANDLES_CLOSED
#  define ERROR_HANDLES_CLOSED 676L   /* in the Windows SDK's winerror.h, not mingw's */
#endif
#ifndef SO_EXCLUSIVEADDRUSE
#  define SO_EXCLUSIVEADDRUSE ((int)(~SO_REUSEADDR))
#endif

int port_err_from_os(int e) {
    switch (e) {
    case 0: return PORT_OK;
    /* Cancelled: by CancelIoEx, or because the socket was closed under the operation. */
    case ERROR_OPERATION_ABORTED:   /* == WSA_OPERATION_ABORTED */
    case ERROR_CANCELLED:
    case WSAECANCELLED:
    case ERROR_HANDLES_CLOSED:      /* 676: Wine's way to end I/O on a socket closed under it */
        return PORT_ECANCELED;
    case WSAEINTR:                  /* a blocking call cancelled (Winsock 1.1 semantics) */
        return PORT_EINTR;
    /* The peer reset the connection.  A completed overlapped operation reports this as
     * ERROR_NETNAME_DELETED (from STATUS_CONNECTION_RESET / STATUS_REMOTE_DISCONNECT). */
    case WSAECONNRESET:
    case ERROR_NETNAME_DELETED:
    case WSAENETRESET:              /* keep-alive found the connection dead */
        return PORT_ECONNRESET;
    case WSAECONNREFUSED:
    case ERROR_CONNECTION_REFUSED:
    case ERROR_PORT_UNREACHABLE:
        return PORT_ECONNREFUSED;
    case WSAECONNABORTED:
    case ERROR_CONNECTION_ABORTED:
    case ERROR_REQUEST_ABORTED:
        return PORT_ECONNABORTED;
    case WSAETIMEDOUT:
    case ERROR_SEM_TIMEOUT:
    case ERROR_TIMEOUT:
        return PORT_ETIMEDOUT;
    case WSAESHUTDOWN:              /* send after shutdown(SD_SEND) */
    case ERROR_BROKEN_PIPE:
    case ERROR_GRACEFUL_DISCONNECT:
        return PORT_EPIPE;
    case WSAENOTCONN:
    case ERROR_CONNECTION_INVALID:
        return PORT_ENOTCONN;
    case WSAENETUNREACH:
    case ERROR_NETWORK_UNREACHABLE:
        return PORT_ENETUNREACH;
    case WSAEHOSTUNREACH:
    case WSAEHOSTDOWN:
    case ERROR_HOST_UNREACHABLE:
        return PORT_EHOSTUNREACH;
    case WSAENETDOWN:
        return PORT_ENETDOWN;
    case WSAEADDRINUSE:
    case ERROR_ADDRESS_ALREADY_ASSOCIATED:
        return PORT_EADDRINUSE;
    case WSAEADDRNOTAVAIL:
        return PORT_EADDRNOTAVAIL;
    case WSAEAFNOSUPPORT:
    case WSAEPFNOSUPPORT:
        return PORT_EAFNOSUPPORT;
    case WSAEMFILE:
    case ERROR_TOO_MANY_OPEN_FILES:
        return PORT_EMFILE;
    case WSAENOBUFS:
    case ERROR_NO_SYSTEM_RESOURCES:
        return PORT_ENOBUFS;
    case ERROR_NOT_ENOUGH_MEMORY:   /* == WSA_NOT_ENOUGH_MEMORY */
    case ERROR_OUTOFMEMORY:
        return PORT_ENOMEM;
    case WSAEINVAL:
    case ERROR_INVALID_PARAMETER:   /* == WSA_INVALID_PARAMETER */
        return PORT_EINVAL;
    case WSAEFAULT:
    case ERROR_NOACCESS:            /* from STATUS_ACCESS_VIOLATION: a bad buffer */
        return PORT_EFAULT;
    case WSAEISCONN:
        return PORT_EISCONN;
    case WSAEDESTADDRREQ:
        return PORT_EDESTADDRREQ;
    case WSAEPROTOTYPE:
        return PORT_EPROTOTYPE;
    case WSAENOPROTOOPT:
        return PORT_ENOPROTOOPT;
    /* Not a socket (closed, or never one): what EBADF / ENOTSOCK are on Linux. */
    case WSAENOTSOCK:
    case WSAEBADF:
    case ERROR_INVALID_HANDLE:      /* == WSA_INVALID_HANDLE */
        return PORT_EBADF;
    case WSAEWOULDBLOCK:
    case WSATRY_AGAIN:
        return PORT_EAGAIN;
    case WSAEACCES:
    case ERROR_ACCESS_DENIED:
        return PORT_EACCES;
    case ERROR_CALL_NOT_IMPLEMENTED:
    case WSASYSCALLFAILURE:
        return PORT_ENOSYS;
    case ERROR_BUSY:
        return PORT_EBUSY;
    case WSAEINPROGRESS:
        return PORT_EINPROGRESS;
    case WSAEALREADY:
        return PORT_EALREADY;
    case ERROR_IO_DEVICE:
        return PORT_EIO;
    case WSAEMSGSIZE:
        return PORT_EMSGSIZE;
    case WSAEOPNOTSUPP:
    case ERROR_NOT_SUPPORTED:
        return PORT_EOPNOTSUPP;
    case WSAEPROTONOSUPPORT:
    case WSAESOCKTNOSUPPORT:
        return PORT_EPROTONOSUPPORT;
    case WSAHOST_NOT_FOUND:
    case WSANO_DATA:
        return PORT_ENONAME;
    }
    return PORT_EUNKNOWN;
}

/* ---- one-time start-up ----------------------------------------------------------------- */

static INIT_ONCE win_once = INIT_ONCE_STATIC_INIT;
static int win_init_rc;
static LPFN_ACCEPTEX win_acceptex[2];      /* [0] AF_INET, [1] AF_INET6 */
static LPFN_CONNECTEX win_connectex[2];
typedef ULONG(WINAPI *nt_to_dos_fn)(LONG);
static nt_to_dos_fn win_nt_to_dos;

/* The extension functions belong to the provider of a socket's family, so they are
 * looked up once per family (a layered provider may differ between IPv4 and IPv6). */
static void load_ext(int family, int slot) {
    GUID acc = WSAID_ACCEPTEX, con = WSAID_CONNECTEX;
    DWORD bytes = 0;
    SOCKET s = WSASocketW(family, SOCK_STREAM, IPPROTO_TCP, NULL, 0, WSA_FLAG_OVERLAPPED);
    if (s == INVALID_SOCKET)
        return;   /* family not installed (no IPv6): its sockets cannot be made either */
    if (WSAIoctl(s, SIO_GET_EXTENSION_FUNCTION_POINTER, &acc, sizeof(acc), &win_acceptex[slot],
                 sizeof(win_acceptex[slot]), &bytes, NULL, NULL) != 0)
        win_acceptex[slot] = NULL;
    if (WSAIoctl(s, SIO_GET_EXTENSION_FUNCTION_POINTER, &con, sizeof(con),
                 &win_connectex[slot], sizeof(win_connectex[slot]), &bytes, NULL, NULL) != 0)
        win_connectex[slot] = NULL;
    closesocket(s);
}

static BOOL CALLBACK win_init_once(PINIT_ONCE once, PVOID param, PVOID *ctx) {
    WSADATA wsa;
    HMODULE ntdll;
    int e;
    PORT_UNUSED(once);
    PORT_UNUSED(param);
    PORT_UNUSED(ctx);
    /* Winsock counts start-ups; this one is never undone (the process keeps Winsock). */
    e = WSAStartup(MAKEWORD(2, 2), &wsa);
    if (e != 0) {
        win_init_rc = port_err_from_os(e);
        return TRUE;
    }
    load_ext(AF_INET, 0);
    load_ext(AF_INET6, 1);
    if (win_acceptex[0] == NULL || win_connectex[0] == NULL)
        win_init_rc = PORT_EUNAVAIL;
    ntdll = GetModuleHandleW(L"ntdll.dll");
    if (ntdll != NULL)
        win_nt_to_dos = (nt_to_dos_fn)(void (*)(void))GetProcAddress(ntdll, "RtlNtStatusToDosError");
    return TRUE;
}

int port__win_init(void) {
    InitOnceExecuteOnce(&win_once, win_init_once, NULL, NULL);
    return win_init_rc;
}

LPFN_ACCEPTEX port__win_acceptex(int family) {
    return win_acceptex[family == AF_INET6 ? 1 : 0];
}
LPFN_CONNECTEX port__win_connectex(int family) {
    return win_connectex[family == AF_INET6 ? 1 : 0];
}

/* NTSTATUS of a completed overlapped operation -> PORT_E*.  The statuses a socket
 * operation ends with are spelled out, so that a local abort is not mistaken for a peer
 * reset (RtlNtStatusToDosError folds both into ERROR_NETNAME_DELETED); anything else
 * goes through RtlNtStatusToDosError and the Win32 table above. */
int port__win_status(LONG status) {
    switch ((unsigned long)status) {
    case 0x00000000UL: return 0;                      /* STATUS_SUCCESS */
    case 0xC0000120UL: return PORT_ECANCELED;         /* STATUS_CANCELLED */
    case 0x8000000AUL: return PORT_ECANCELED;         /* STATUS_HANDLES_CLOSED: Wine, for a
                                                       * socket closed under the I/O (Windows
                                                       * says STATUS_CANCELLED there) */
    case 0xC000020DUL:                                /* STATUS_CONNECTION_RESET */
    case 0xC000013CUL:                                /* STATUS_REMOTE_DISCONNECT */
        return PORT_ECONNRESET;
    case 0xC000013BUL:                                /* STATUS_LOCAL_DISCONNECT */
    case 0xC0000241UL:                                /* STATUS_CONNECTION_ABORTED */
        return PORT_ECONNABORTED;
    case 0xC0000236UL: return PORT_ECONNREFUSED;      /* STATUS_CONNECTION_REFUSED */
    case 0xC000023FUL: return PORT_ECONNREFUSED;      /* STATUS_PORT_UNREACHABLE */
    case 0xC00000B5UL: return PORT_ETIMEDOUT;         /* STATUS_IO_TIMEOUT */
    case 0xC000023CUL: return PORT_ENETUNREACH;       /* STATUS_NETWORK_UNREACHABLE */
    case 0xC000023DUL: return PORT_EHOSTUNREACH;      /* STATUS_HOST_UNREACHABLE */
    case 0xC000020AUL: return PORT_EADDRINUSE;        /* STATUS_ADDRESS_ALREADY_EXISTS */
    case 0xC0000008UL:                                /* STATUS_INVALID_HANDLE */
    case 0xC0000024UL:                                /* STATUS_OBJECT_TYPE_MISMATCH */
        return PORT_EBADF;
    case 0xC000009AUL: return PORT_ENOBUFS;           /* STATUS_INSUFFICIENT_RESOURCES */
    case 0xC0000017UL: return PORT_ENOMEM;            /* STATUS_NO_MEMORY */
    }
    if (win_nt_to_dos != NULL) {
        int rc = port_err_from_os((int)win_nt_to_dos(status));
        if (rc != PORT_EUNKNOWN)
            return rc;
    }
    return PORT_EIO;
}

/* ---- sockets -------------------------------------------------------------------------- */

/* An overlapped TCP socket that child processes do not inherit (close-on-exec). */
SOCKET port__win_socket(int family) {
    SOCKET s = WSASocketW(family, SOCK_STREAM, IPPROTO_TCP, NULL, 0,
                          WSA_FLAG_OVERLAPPED | WSA_FLAG_NO_HANDLE_INHERIT);
    if (s == INVALID_SOCKET && WSAGetLastError() == WSAEINVAL) {
        /* Before Windows 7 SP1 the flag is unknown: clear inheritance by hand. */
        s = WSASocketW(family, SOCK_STREAM, IPPROTO_TCP, NULL, 0, WSA_FLAG_OVERLAPPED);
        if (s != INVALID_SOCKET)
            SetHandleInformation((HANDLE)s, HANDLE_FLAG_INHERIT, 0);
    }
    return s;
}

int port__win_nonblock(SOCKET s) {
    u_long on = 1;
    if (ioctlsocket(s, FIONBIO, &on) != 0)
        return port_err_from_os(WSAGetLastError());
    return 0;
}

int port__win_listen_socket(const port_addr_t *addr, int backlog, int flags, SOCKET *out) {
    int family = addr->ss.ss_family, e, one = 1;
    SOCKET s;

    if (flags & PORT_LISTEN_REUSEPORT)
        return PORT_EOPNOTSUPP;   /* Windows' SO_REUSEADDR lets another socket steal the
                                   * port: not the load-sharing SO_REUSEPORT means */
    s = port__win_socket(family);
    if (s == INVALID_SOCKET)
        return port_err_from_os(WSAGetLastError());
    /* No SO_REUSEADDR: Windows binds a listener next to TIME_WAIT connections anyway.
     * SO_EXCLUSIVEADDRUSE keeps another process from binding the same port over us.
     * Best effort: an old stack without it still listens. */
    (void)setsockopt(s, SOL_SOCKET, SO_EXCLUSIVEADDRUSE, (const char *)&one, sizeof(one));
    if (family == AF_INET6) {
        /* Windows defaults to IPv6-only; port.h's default is dual stack. */
        DWORD v6only = (flags & PORT_LISTEN_V6ONLY) ? 1 : 0;
        if (setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, (const char *)&v6only, sizeof(v6only)) != 0)
            goto fail;
    }
    if (bind(s, (const struct sockaddr *)&addr->ss, addr->len) != 0)
        goto fail;
    if (listen(s, backlog) != 0)
        goto fail;
    *out = s;
    return 0;
fail:
    e = WSAGetLastError();
    closesocket(s);
    return port_err_from_os(e);
}

int port__win_close(SOCKET s, int flags) {
    if (s == INVALID_SOCKET)
        return PORT_EBADF;
    if (flags & PORT_CLOSE_RESET) {
        /* Linger with a zero timeout: closesocket discards unsent data and sends a reset. */
        struct linger lg;
        lg.l_onoff = 1;
        lg.l_linger = 0;
        (void)setsockopt(s, SOL_SOCKET, SO_LINGER, (const char *)&lg, sizeof(lg));
    }
    /* With the default linger, closesocket returns at once and the stack finishes the
     * graceful close (sends what is queued, then FIN) in the background. */
    if (closesocket(s) != 0)
        return port_err_from_os(WSAGetLastError());
    return 0;
}

int port_sockname(port_sock_t s, port_addr_t *out) {
    int len = (int)sizeof(out->ss);
    if (getsockname(s, (struct sockaddr *)&out->ss, &len) != 0)
        return port_err_from_os(WSAGetLastError());
    out->len = len;
    return 0;
}

/* On Windows this needs SO_UPDATE_ACCEPT_CONTEXT / SO_UPDATE_CONNECT_CONTEXT on sockets
 * from AcceptEx / ConnectEx (iocp.c sets them); without it getpeername fails with
 * WSAENOTCONN.  Wine answers either way. */
int port_peername(port_sock_t s, port_addr_t *out) {
    int len = (int)sizeof(out->ss);
    if (getpeername(s, (struct sockaddr *)&out->ss, &len) != 0)
        return port_err_from_os(WSAGetLastError());
    out->len = len;
    return 0;
}

int port_set_nodelay(port_sock_t s, int on) {
    BOOL v = on ? TRUE : FALSE;
    if (setsockopt(s, IPPROTO_TCP, TCP_NODELAY, (const char *)&v, sizeof(v)) != 0)
        return port_err_from_os(WSAGetLastError());
    return 0;
}

/* SIO_TCP_INFO (Windows 10 1703) and the first version of its answer, as the Windows
 * SDK declares them (mingw's headers hide them behind NTDDI_VERSION). */
#ifndef SIO_TCP_INFO
#  define SIO_TCP_INFO _WSAIORW(IOC_VENDOR, 39)
#endif
typedef struct port_tcp_info_v0 {
    int State;
    ULONG Mss;
    ULONG64 ConnectionTimeMs;
    BOOLEAN TimestampsEnabled;
    ULONG RttUs;
    ULONG MinRttUs;
    ULONG BytesInFlight;
    ULONG Cwnd;
    ULONG SndWnd;
    ULONG RcvWnd;
    ULONG RcvBuf;
    ULONG64 BytesOut;
    ULONG64 BytesIn;
    ULONG BytesReordered;
    ULONG BytesRetrans;
    ULONG FastRetrans;
    ULONG DupAcksIn;
    ULONG TimeoutEpisodes;
    UCHAR SynRetrans;
} port_tcp_info_v0;

int64_t port_sock_drain(port_sock_t s) {
    char buf[16384];
    int64_t total = 0;
    while (total < ((int64_t)256 << 10)) {
        u_long avail = 0;
        int n;
        /* Only what is there (FIONREAD), so that recv never blocks. */
        if (ioctlsocket(s, FIONREAD, &avail) != 0)
            return total > 0 ? total : port_err_from_os(WSAGetLastError());
        if (avail == 0)
            break;
        n = recv(s, buf, (int)(avail < sizeof(buf) ? avail : sizeof(buf)), 0);
        if (n <= 0)
            break;
        total += n;
    }
    return total;
}

int port_sock_send_progress(port_sock_t s, uint64_t *mark) {
    DWORD version = 0, got = 0;
    port_tcp_info_v0 info;
    memset(&info, 0, sizeof(info));
    if (WSAIoctl(s, SIO_TCP_INFO, &version, sizeof(version), &info, sizeof(info), &got,
                 NULL, NULL) != 0 || got < sizeof(info))
        return PORT_EOPNOTSUPP;            /* before Windows 10 1703, or Wine */
    /* Bytes sent minus those still unacknowledged: a zero-window probe's byte stays in
     * flight, so the mark moves only when the peer takes data. */
    *mark = (uint64_t)(info.BytesOut - info.BytesInFlight);
    return 0;
}
#endif /* _WIN32 */
