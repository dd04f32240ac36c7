/*
 * py_floor.c -- what a Python server library that cost nothing would reach: the C io_uring
 * echo server's loop (c_uring_echo.c: the same ring flags, a multishot receive per
 * connection on a provided-buffer ring, a registered ring fd) calling a Python hook for
 * every receive completion, OnRecv(session, view), whose session.Send(view) writes the
 * reply at once with send(2), before the next hook of the batch runs, as iocpnet does.
 * Nothing else per completion: no strands, locks, statistics, limits or time stamps; a
 * full socket is finished by a blocking send (counted; a real library queues it).  So
 * its CPU per round trip, against c-uring's, is the best any library can do that calls
 * a Python hook per completion and keeps the reply rule (issue 14's pipelined target).
 *
 * A Python extension module (_py_floor), built by run.py into benchmarks/build/; the
 * server is servers/py_floor_echo.py.  serve(port, session_class[, seconds]).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <time.h>

/* c_uring_echo's ring, buffers and submission helpers, its connections carrying the
 * Python session and its OnRecv */
#define C_URING_ECHO_RING
/* As many buffers as iocpnet's ring holds in the 100-connection cells (it grows by one per
 * receive that finds it empty: ~100, one per connection of a burst), not c_uring_echo's 512:
 * the kernel hands them out in ring order, so all of them circulate, and 512 make every
 * receive's copy colder (c_uring_echo pays for that in the kernel; a library need not). */
#define NBUF 128u
#define CONN_EXTRA PyObject *sess, *on_recv;
#include "c_uring_echo.c"

/* ---- the Python side: Session (Send) and View (the received bytes) ---- */
typedef struct {
    PyObject_HEAD
    int fd;
} SessionObject;

typedef struct {
    PyObject_HEAD
    const char *ptr;
    Py_ssize_t len;
} ViewObject;

static long slow_sends, kept_views, completions, batches;

#ifdef PY_FLOOR_RING_SEND
/* The variant that sends as c-uring does: an echo of the completion's own view is queued
 * as a send SQE from that buffer and goes in with the pass's io_uring_enter (after every
 * hook of the batch has run: the reply rule is given up). Other data is sent at once. */
static PyObject *cur_view;
static int cur_view_sent;
#define MODULE_NAME "_py_floor_ring"
#define MODULE_INIT PyInit__py_floor_ring
#else
#define MODULE_NAME "_py_floor"
#define MODULE_INIT PyInit__py_floor
#endif

static int view_getbuffer(PyObject *o, Py_buffer *b, int flags)
{
    ViewObject *v = (ViewObject *)o;
    return PyBuffer_FillInfo(b, o, (void *)v->ptr, v->len, 1, flags);
}
static Py_ssize_t view_length(PyObject *o) { return ((ViewObject *)o)->len; }
static PyBufferProcs view_as_buffer = {view_getbuffer, NULL};
static PySequenceMethods view_as_seq = {.sq_length = view_length};
static PyTypeObject ViewType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "_py_floor.View",
    .tp_basicsize = sizeof(ViewObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_as_buffer = &view_as_buffer,
    .tp_as_sequence = &view_as_seq,
    .tp_new = NULL,
};

static PyObject *session_send(PyObject *self, PyObject *data)
{
    int fd = ((SessionObject *)self)->fd;
    const char *ptr;
    Py_ssize_t len;
    Py_buffer b;
    int have = 0;
#ifdef PY_FLOOR_RING_SEND
    if (data == cur_view && !cur_view_sent) {
        cur_view_sent = 1;
        Py_RETURN_TRUE;
    }
#endif
    if (Py_IS_TYPE(data, &ViewType)) {
        ptr = ((ViewObject *)data)->ptr;
        len = ((ViewObject *)data)->len;
    } else if (PyBytes_CheckExact(data)) {
        ptr = PyBytes_AS_STRING(data);
        len = PyBytes_GET_SIZE(data);
    } else {
        if (PyObject_GetBuffer(data, &b, PyBUF_SIMPLE) < 0)
            return NULL;
        ptr = b.buf;
        len = b.len;
        have = 1;
    }
    ssize_t r = send(fd, ptr, (size_t)len, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r != len) {
        /* a partial write or a full socket: finish it blocking (counted; ~never in the
         * benchmark) -- a real library queues it */
        Py_ssize_t done = r > 0 ? r : 0;
        slow_sends++;
        if (r < 0 && errno != EAGAIN) {
            if (have)
                PyBuffer_Release(&b);
            Py_RETURN_FALSE;
        }
        while (done < len) {
            r = send(fd, ptr + done, (size_t)(len - done), MSG_NOSIGNAL);
            if (r < 0 && errno != EINTR)
                break;
            if (r > 0)
                done += r;
        }
    }
    if (have)
        PyBuffer_Release(&b);
    Py_RETURN_TRUE;
}

static PyMethodDef session_methods[] = {
    {"Send", session_send, METH_O, "send at once"},
    {NULL, NULL, 0, NULL},
};
static PyTypeObject SessionType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "_py_floor.Session",
    .tp_basicsize = sizeof(SessionObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_methods = session_methods,
    .tp_new = PyType_GenericNew,
};

static ViewObject *spare;

static void conn_free(struct conn *c)
{
    if (c->recv_armed || c->send_busy || c->wants_rearm)
        return; /* freed when the last of them completes */
    while (c->q_head != NO_BUF) {
        uint16_t bid = c->q_head;
        c->q_head = R.buf_next[bid];
        buf_give(bid);
    }
    close(c->fd);
    Py_XDECREF(c->on_recv);
    Py_XDECREF(c->sess);
    free(c);
}

static void handle(PyObject *cls, uint64_t ud, int res, unsigned flags)
{
    unsigned op = (unsigned)(ud & OP_MASK);
    if (op == OP_ACCEPT) {
        if (res >= 0) {
            int one = 1;
            setsockopt(res, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            struct conn *c = calloc(1, sizeof *c);
            PyObject *s = PyObject_CallNoArgs(cls);
            PyObject *h = s ? PyObject_GetAttrString((PyObject *)Py_TYPE(s), "OnRecv") : NULL;
            if (!c || !h) {
                PyErr_Print();
                Py_XDECREF(s);
                free(c);
                close(res);
            } else {
                ((SessionObject *)s)->fd = res;
                c->fd = res;
                c->q_head = c->q_tail = NO_BUF;
                c->sess = s;
                c->on_recv = h;
                arm_recv(c);
            }
        }
        if (!(flags & IORING_CQE_F_MORE))
            queue_accept();
        return;
    }
    struct conn *c = (struct conn *)(uintptr_t)(ud & ~OP_MASK);
    if (op == OP_SEND) {
        c->send_busy = 0;
        uint16_t bid = c->q_head;
        c->q_head = R.buf_next[bid];
        buf_give(bid);
        if (res < 0 || (unsigned)res < R.buf_len[bid]) {
            if (!c->closing) {
                c->closing = 1;
                shutdown(c->fd, SHUT_RDWR);
            }
        } else if (c->q_head != NO_BUF && !c->closing) {
            send_head(c);
        }
        if (c->closing)
            conn_free(c);
        return;
    }
    if (!(flags & IORING_CQE_F_MORE))
        c->recv_armed = 0;
    if (res > 0) {
        completions++;
        uint16_t bid = (uint16_t)(flags >> IORING_CQE_BUFFER_SHIFT);
        ViewObject *v = spare;
        if (v == NULL) {
            v = PyObject_New(ViewObject, &ViewType);
            if (v == NULL) {
                PyErr_Print();
                exit(1);
            }
        }
        spare = NULL;
        v->ptr = (const char *)(R.bufs + (size_t)bid * BUFSZ);
        v->len = res;
        PyObject *args[2] = {c->sess, (PyObject *)v};
#ifdef PY_FLOOR_RING_SEND
        cur_view = (PyObject *)v;
        cur_view_sent = 0;
#endif
        PyObject *r = PyObject_Vectorcall(c->on_recv, args, 2, NULL);
#ifdef PY_FLOOR_RING_SEND
        cur_view = NULL;
#endif
        if (r == NULL) {
            PyErr_Print();
            c->closing = 1;
        } else {
            Py_DECREF(r);
        }
        if (Py_REFCNT(v) == 1) {
            spare = v;          /* nobody kept it: the next completion's */
        } else {
            kept_views++;
            v->len = 0;         /* (the echo never keeps it) */
            Py_DECREF(v);
        }
#ifdef PY_FLOOR_RING_SEND
        if (cur_view_sent && !c->closing)
            enqueue(c, bid, (unsigned)res);
        else
#endif
            buf_give(bid);
        if (!c->recv_armed && !c->closing)
            arm_recv(c);
        else if (!c->recv_armed)
            conn_free(c);
        return;
    }
    if (res == -ENOBUFS && !c->closing) {
        wait_for_buffers(c);
        return;
    }
    c->closing = 1;
    if (!c->recv_armed)
        conn_free(c);
    else
        shutdown(c->fd, SHUT_RDWR);
}

static PyObject *floor_serve(PyObject *mod, PyObject *args)
{
    int port;
    PyObject *cls;
    double seconds = 0; /* > 0: return after that long, waiting in 50 ms slices
                         * (callgrind: valgrind delivers no signal into io_uring_enter) */
    if (!PyArg_ParseTuple(args, "iO|d", &port, &cls, &seconds))
        return NULL;
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    signal(SIGPIPE, SIG_IGN);
    if (listen_loopback(port) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    ring_init();
    queue_accept();
    for (;;) {
        int r;
        publish();
        unsigned n = pending_submit();
        Py_BEGIN_ALLOW_THREADS
        if (seconds > 0) {
            struct __kernel_timespec ts = {0, 50 * 1000000};
            struct io_uring_getevents_arg ga = {.sigmask = 0, .sigmask_sz = 8,
                                                .ts = (uint64_t)(uintptr_t)&ts};
            r = (int)syscall(__NR_io_uring_enter, R.enter_fd, n, 1,
                             IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG | R.enter_flags,
                             &ga, sizeof ga);
        } else {
            r = sys_enter(n, 1, IORING_ENTER_GETEVENTS);
        }
        Py_END_ALLOW_THREADS
        if (seconds > 0) {
            struct timespec t1;
            clock_gettime(CLOCK_MONOTONIC, &t1);
            if ((t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9 > seconds)
                break;
        }
        if (r < 0 && errno == ETIME)
            r = 0;
        if (r < 0 && errno != EINTR && errno != EAGAIN && errno != EBUSY)
            return PyErr_SetFromErrno(PyExc_OSError);
        if (PyErr_CheckSignals() < 0)   /* a signal may come outside the enter too */
            break;
        unsigned head = *R.cq_head;
        unsigned tail = __atomic_load_n(R.cq_tail, __ATOMIC_ACQUIRE);
        while (head != tail) {
            struct io_uring_cqe *cqe = &R.cqes[head & *R.cq_mask];
            uint64_t ud = cqe->user_data;
            int res = cqe->res;
            unsigned fl = cqe->flags;
            head++;
            __atomic_store_n(R.cq_head, head, __ATOMIC_RELEASE);
            handle(cls, ud, res, fl);
            if (head == tail)
                tail = __atomic_load_n(R.cq_tail, __ATOMIC_ACQUIRE);
        }
        batches++;
        buf_publish();
        if (rearm_list) {
            struct conn *c = rearm_list;
            rearm_list = NULL;
            while (c) {
                struct conn *next = c->rearm_next;
                c->wants_rearm = 0;
                if (!c->recv_armed && !c->closing)
                    arm_recv(c);
                else if (c->closing)
                    conn_free(c);
                c = next;
            }
        }
    }
    fprintf(stderr, "slow sends %ld, kept views %ld\n", slow_sends, kept_views);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *floor_stats(PyObject *mod, PyObject *noargs)
{
    return Py_BuildValue("{s:l,s:l,s:l,s:l}", "completions", completions, "batches", batches,
                         "slow_sends", slow_sends, "kept_views", kept_views);
}

static PyMethodDef floor_methods[] = {
    {"stats", floor_stats, METH_NOARGS, "counts"},
    {"serve", floor_serve, METH_VARARGS, "serve(port, session_class)"},
    {NULL, NULL, 0, NULL},
};
static struct PyModuleDef floor_module = {PyModuleDef_HEAD_INIT, MODULE_NAME, NULL, -1,
                                          floor_methods};

PyMODINIT_FUNC MODULE_INIT(void)
{
    if (PyType_Ready(&ViewType) < 0 || PyType_Ready(&SessionType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&floor_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&SessionType);
    PyModule_AddObject(m, "Session", (PyObject *)&SessionType);
    return m;
}
