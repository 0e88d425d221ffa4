# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""pgmux's compiled data path: an epoll set of its own, C buffers, framing and link state in C.

Read `_engine.pxd` first: it is the written interface (modes, hooks, fields). This file follows
PgBouncer's split: the I/O of one socket (`Link.send_bytes`, `Engine._flush`, `_read_*`, like
sbuf.c), one walker per side that says forward / escape (`_client_walk`, `_server_walk`, like
client.c and server.c), and the link state changed in one place per event (`note_request`,
`ready_for_query`, `copy_*`, `_end_of_transaction`).

Every length read from the wire is checked before use: a header is read only with 5 bytes in
hand, a body only once `1 + length` bytes are in hand, a length below 4 or above max_packet_size
is handed to Python (which refuses it with PgBouncer's error) without being used.
"""

import os
import socket
import ssl
from collections import OrderedDict

from cpython.buffer cimport PyBUF_READ, PyBUF_WRITE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.ref cimport PyObject, Py_INCREF, Py_XDECREF
from cpython.unicode cimport PyUnicode_InternFromString
from libc.errno cimport EAGAIN, EINTR, errno  # (EWOULDBLOCK == EAGAIN on Linux)
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove, strlen
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.unistd cimport close


cdef extern from "Python.h":
    Py_ssize_t PyDict_GET_SIZE(object d)  # (an OrderedDict is a dict underneath)

from pgmux.engine._login cimport (
    GSSENC_REQUEST_CODE, MAX_AUTH_MESSAGE, MAX_STARTUP_PACKET, MD5_INNER_LEN, PROTOCOL_3_0, SCRAM_KEY_LEN,
    SCRAM_NONCE_RAW, SSL_REQUEST_CODE, ScramLogin, auth_request, b64_encode, be32, md5_password_ok, scram_final,
    scram_first, startup_params, write_be32,
)
from pgmux.engine._querystats cimport QueryStats, skip_number
from pgmux.engine._ossl cimport (
    TLS_EOF, TLS_ERROR, TLS_WANT, tls_error_text, tls_feed, tls_native_from, tls_pending, tls_read, tls_take_output,
    tls_write,
)


cdef extern from *:
    int __builtin_ctzll(unsigned long long x) nogil

cdef extern from "dlfcn.h" nogil:
    void *dlopen(const char *filename, int flags)
    void *dlsym(void *handle, const char *symbol)
    int RTLD_NOW
    int RTLD_NOLOAD

ctypedef void (*uv_walk_cb)(void *handle, void *arg) noexcept nogil
ctypedef void (*uv_walk_fn)(void *loop, uv_walk_cb cb, void *arg) noexcept nogil

cdef enum:
    UV_CHECK_TYPE = 2                    # uv_handle_type's UV_CHECK
    HOLD_TAG = 0xFFFFFFFF                # epoll data of libuv's fd in the engine's set (no fd is that)
    HOLD_MAX_MS = 1000                   # longest single wait while holding
    HOLD_QUIET_MAX = 64                  # most quiet batches a hold may wait for (Engine.quiet_need)

cdef struct CheckWalk:
    void **out
    int n


cdef void _collect_checks(void *handle, void *arg) noexcept nogil:
    """uv_walk's callback: the check handles. uv_handle_t starts with `void *data; uv_loop_t *loop;
    uv_handle_type type` (uv.h's UV_HANDLE_FIELDS; uv_handle_get_type is not exported by uvloop)."""
    cdef CheckWalk *w = <CheckWalk *>arg
    if (<int *>(<char *>handle + 2 * sizeof(void *)))[0] == UV_CHECK_TYPE and w.n < UV_CHECKS_MAX:
        w.out[w.n] = handle
        w.n += 1

cdef extern from "sys/epoll.h" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        unsigned int u32
        unsigned long long u64
    struct epoll_event:
        unsigned int events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC

cdef extern from "sys/socket.h" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t
    struct sockaddr:
        sa_family_t sa_family
    struct sockaddr_storage:
        sa_family_t ss_family
    ssize_t recv(int sockfd, void *buf, size_t len, int flags)
    ssize_t send(int sockfd, const void *buf, size_t len, int flags)
    int shutdown(int sockfd, int how)
    int accept4(int sockfd, sockaddr *addr, socklen_t *addrlen, int flags)
    int getsockname(int sockfd, sockaddr *addr, socklen_t *addrlen)
    int setsockopt(int sockfd, int level, int optname, const void *optval, socklen_t optlen)
    enum:
        MSG_NOSIGNAL
        MSG_DONTWAIT
        SHUT_WR
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        AF_INET
        AF_INET6
        AF_UNIX

cdef extern from "netinet/in.h" nogil:
    struct in_addr:
        unsigned int s_addr
    struct in6_addr:
        pass
    struct sockaddr_in:
        unsigned short sin_port
        in_addr sin_addr
    struct sockaddr_in6:
        unsigned short sin6_port
        in6_addr sin6_addr
    unsigned short ntohs(unsigned short)

cdef extern from "sys/random.h" nogil:
    ssize_t getrandom(void *buf, size_t buflen, unsigned int flags)

# AuthenticationSASL offering SCRAM-SHA-256 (the engine's SCRAM exchange): its mechanism list
cdef enum:
    AUTH_SASL = 10
    AUTH_SASL_CONTINUE = 11
    AUTH_SASL_FINAL = 12
cdef bytes AUTH_SASL_SCRAM = auth_request(AUTH_SASL, <const unsigned char *>b"SCRAM-SHA-256\0\0", 15)

cdef extern from "arpa/inet.h" nogil:
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)

cdef extern from "fcntl.h" nogil:
    int open(const char *pathname, int flags)
    enum:
        O_RDONLY
        O_CLOEXEC

cdef extern from "errno.h" nogil:
    enum:
        ECONNABORTED
        EMFILE
        ENFILE
        ENOBUFS
        ENOMEM



# ServerStatements.lru's move_to_end, looked up once (a method lookup per Bind was a tenth of it)
_move_to_end = OrderedDict.move_to_end

cdef enum:
    SHARED_SIZE = 65536       # one read at most
    MIN_KEEP = 4096           # smallest buffer a link owns while it keeps bytes between reads
    MAX_EVENTS = 256
    ACCEPT_BATCH = 64         # connections accepted per ready listening socket and batch
    HOLD_LIMIT = 1 << 20      # bytes kept for a queued client before it is read no more (client.HOLD_LIMIT)
    HIGH_WATER = 65536        # asyncio's defaults: pause_writing above, resume_writing at or below
    LOW_WATER = 16384

# A lingering close (Link.linger): how long what the peer still sends is read and dropped after
# the last byte and a FIN went out, so that its late bytes meet no RST (which would discard the
# ErrorResponse pgmux sent before closing, unread, on the peer's side).
# At most LINGER_BYTES are dropped so: a peer that keeps streaming is reset, as without lingering.
cdef double LINGER_SECONDS = 2.0
cdef long long LINGER_BYTES = 65536




cdef inline bint may_deallocate(unsigned char ch) noexcept nogil:
    """A query starting with this byte may be SQL DEALLOCATE (client._D_FIRST): Python looks."""
    return ch == 32 or ch == 9 or ch == 10 or ch == 13 or ch == 100 or ch == 68


cdef int grow(unsigned char **buf, Py_ssize_t *cap, Py_ssize_t need) except -1:
    """Make *buf (malloc'd, *cap bytes) hold at least `need` bytes: doubled from MIN_KEEP up,
    contents kept. Every buffer of the engine grows here."""
    cdef Py_ssize_t size = cap[0] if cap[0] else MIN_KEEP
    cdef unsigned char *nb
    if need <= cap[0]:
        return 0
    while size < need:
        size *= 2
    nb = <unsigned char *>realloc(buf[0], size)
    if nb == NULL:
        raise MemoryError()
    buf[0] = nb
    cap[0] = size
    return 0


cdef object carried_to_python(Link link, const unsigned char *p, Py_ssize_t k):
    """p[0:k] as the front of a new buffer of the Python protocol (buf, mv; keep = k)."""
    buf = bytearray(MIN_KEEP if MIN_KEEP > 2 * k else 2 * k)
    buf[:k] = PyBytes_FromStringAndSize(<char *>p, k)
    link.buf = buf
    link.mv = memoryview(buf)
    link.keep = k


cdef inline double monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)   # the clock of Python's time.monotonic()
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline unsigned char lower(unsigned char ch) noexcept nogil:
    if 65 <= ch <= 90:
        return ch + 32
    return ch


cdef inline bint is_space(unsigned char ch) noexcept nogil:
    # bytes.strip()'s whitespace
    return ch == 32 or ch == 9 or ch == 10 or ch == 13 or ch == 11 or ch == 12


cdef inline bint starts_nocase(const unsigned char *p, Py_ssize_t n, const char *word, Py_ssize_t wn) noexcept nogil:
    """p[0:n] starts with `word` (wn bytes of lower case ASCII), ignoring ASCII case."""
    cdef Py_ssize_t j
    if wn > n:
        return False
    for j in range(wn):
        if lower(p[j]) != <unsigned char>word[j]:
            return False
    return True


# Statements that never create session state (pgmux.protocol.sessionstate._PLAIN_STARTS).
cdef const char *PLAIN_STARTS[25]
PLAIN_STARTS[:] = [b"select", b"insert", b"update", b"delete", b"with", b"begin", b"commit", b"rollback",
                   b"end", b"values", b"fetch", b"move", b"copy", b"savepoint", b"release", b"explain",
                   b"table", b"show", b"start", b"abort", b"notify", b"call", b"merge", b"lock", b"truncate"]


cdef Py_ssize_t PLAIN_LENS[25]
for _k in range(25):
    PLAIN_LENS[_k] = strlen(PLAIN_STARTS[_k])

# Scanning eight bytes at a time (SWAR): a block is looked at byte by byte only when one of its
# bytes may be a byte searched for (has_byte: no false negatives).
cdef unsigned long long ONES = 0x0101010101010101ULL
cdef unsigned long long HIGHS = 0x8080808080808080ULL
cdef unsigned long long CASE = 0x2020202020202020ULL


cdef inline unsigned long long load8(const unsigned char *p) noexcept nogil:
    cdef unsigned long long x
    memcpy(&x, p, 8)
    return x


cdef inline bint has_byte(unsigned long long x, unsigned char b) noexcept nogil:
    cdef unsigned long long v = x ^ (ONES * b)
    return ((v - ONES) & ~v & HIGHS) != 0


cdef inline unsigned long long nonzero_bytes(unsigned long long v) noexcept nogil:
    """The high bit of each byte of v that is not zero (exact: no carry between bytes)."""
    cdef unsigned long long low = ONES * 127
    return (((v & low) + low) | v) & HIGHS


cdef inline unsigned long long digit_bytes(unsigned long long x) noexcept nogil:
    """The high bit of each byte of x that is an ASCII digit (exact, as has_digit)."""
    cdef unsigned long long low = x & (ONES * 127)
    return (ONES * (127 + 58) - low) & ~x & (low + ONES * (127 - 47)) & HIGHS


cdef inline bint state_byte_at(const unsigned char *q, Py_ssize_t n, Py_ssize_t j, Py_ssize_t end) noexcept nogil:
    """maybe_session_state's test at q[j]: a ';' before `end`, or the `v` of "advisory" or the
    `f` of "set_config" (rare letters as anchors; ASCII case ignored)."""
    cdef unsigned char ch = q[j], low = q[j] | 32
    if ch == 59:
        return j < end
    if low == 118:
        return j >= 2 and starts_nocase(q + j - 2, n - j + 2, b"advisory", 8)
    if low == 102:
        return j >= 7 and starts_nocase(q + j - 7, n - j + 7, b"set_config", 10)
    return False


cdef bint maybe_session_state(const unsigned char *q, Py_ssize_t n) noexcept nogil:
    """The keyword test of sessionstate.hint() in C: False when the query surely needs no probe
    (one plain statement naming neither advisory locks nor set_config). True sends it to Python,
    which runs the full test. One pass over the text after the first keyword."""
    cdef Py_ssize_t head = n if n < 12 else 12
    cdef Py_ssize_t i = 0, k, end
    cdef bint plain = False
    cdef unsigned char first
    cdef unsigned long long x, y
    while i < head and is_space(q[i]):
        i += 1
    if i >= head:
        return True
    first = q[i] | 32
    for k in range(25):
        if <unsigned char>PLAIN_STARTS[k][0] == first and starts_nocase(q + i, head - i, PLAIN_STARTS[k], PLAIN_LENS[k]):
            plain = True
            break
    if not plain:
        return True
    end = n
    while end > 0 and (q[end - 1] == 32 or q[end - 1] == 9 or q[end - 1] == 13 or q[end - 1] == 10
                       or q[end - 1] == 59):
        end -= 1
    i = 0
    while i + 8 <= n:
        x = load8(q + i)
        y = x | CASE
        if has_byte(x, 59) or has_byte(y, 118) or has_byte(y, 102):
            for k in range(i, i + 8):
                if state_byte_at(q, n, k, end):
                    return True
        i += 8
    while i < n:
        if state_byte_at(q, n, i, end):
            return True
        i += 1
    return False


cdef inline bint database_at(const unsigned char *q, Py_ssize_t n, Py_ssize_t j) noexcept nogil:
    """"atabase" or "ATABASE" with its `b`/`B` at q[j]."""
    if j < 3 or j + 4 > n:
        return False
    if q[j] == 98:
        return memcmp(q + j - 3, b"atabase", 7) == 0
    if q[j] == 66:
        return memcmp(q + j - 3, b"ATABASE", 7) == 0
    return False


cdef bint names_database(const unsigned char *q, Py_ssize_t n) noexcept nogil:
    """The query may be DROP/CREATE/ALTER DATABASE ("atabase" or "ATABASE" in it): Python decides
    whether a drain comes first. Eight bytes at a time, anchored on the rare `b`/`B`."""
    cdef Py_ssize_t i = 0, k
    while i + 8 <= n:
        if has_byte(load8(q + i) | CASE, 98):
            for k in range(i, i + 8):
                if database_at(q, n, k):
                    return True
        i += 8
    while i < n:
        if database_at(q, n, i):
            return True
        i += 1
    return False


cdef inline Py_ssize_t cstr_len(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    """Length of the NUL-terminated string at p within n bytes, or -1 when unterminated."""
    cdef Py_ssize_t i
    for i in range(n):
        if p[i] == 0:
            return i
    return -1


cdef inline bint names_statement(const unsigned char *body, Py_ssize_t blen, unsigned char typ) noexcept nogil:
    """A whole Bind (66) or Describe (68) body names a prepared statement, or is malformed."""
    cdef Py_ssize_t pos
    if typ == 66:
        pos = cstr_len(body, blen)
        if pos < 0:
            return True
        pos += 1
    else:
        if blen < 1 or body[0] != 83:
            return False
        pos = 1
    return cstr_len(body + pos, blen - pos) != 0


cdef inline bint digit(unsigned char ch) noexcept nogil:
    return 48 <= ch <= 57


cdef unsigned char WORD_BYTE[256]  # bytes that continue a name (a digit after one is part of it)
for _k in range(256):
    WORD_BYTE[_k] = (97 <= _k <= 122) or (65 <= _k <= 90) or (48 <= _k <= 57) or _k == 95 or _k == 36 or _k >= 128


# Bytes after which a minus before a number is its sign for the normalizer (_querystats: a token
# that cannot end an operand): operators and `(`, `[`, `,`, `:`. Not `;`: the normalizer keeps
# the operand state across it.
cdef unsigned char FOLD_BEFORE[256]
for _c in bytearray(b"+-*<>=~!@#%^&|`?,([:"):
    FOLD_BEFORE[_c] = 1


cdef inline bint word_byte(unsigned char ch) noexcept nogil:
    return WORD_BYTE[ch] != 0


cdef inline bint has_digit(unsigned long long x) noexcept nogil:
    """Some byte of x is an ASCII digit (SWAR: a byte between 0x2F and 0x3A, exclusive)."""
    cdef unsigned long long low = x & (ONES * 127)
    return (((ONES * (127 + 58) - low) & ~x & (low + ONES * (127 - 47))) & HIGHS) != 0


cdef bint folded_minus(const unsigned char *q, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """q[i] is a minus that the normalizer reads as the sign of the number after it: a digit
    follows, and the token before cannot end an operand (an operator, `(`, `,`, or nothing).
    Looked at conservatively: a newline before it (a `--` comment may end there), `*/`, or any
    other byte than those listed says no."""
    cdef Py_ssize_t k = i - 1
    cdef unsigned char p
    if q[i] != 45 or i + 1 >= n or not digit(q[i + 1]):
        return False
    while k >= 0 and (q[k] == 32 or q[k] == 9 or q[k] == 13):
        k -= 1
    if k < 0:
        return True
    p = q[k]
    if p == 47:
        return k == 0 or q[k - 1] != 42  # `/`, not the end of a block comment
    if p == 45 and (k == i - 1 or (k > 0 and q[k - 1] == 45)):
        return False  # `--`: a comment starts (or went on) there
    return FOLD_BEFORE[p] != 0


cdef bint same_shape(const unsigned char *a, Py_ssize_t an, const unsigned char *b, Py_ssize_t bn) noexcept nogil:
    """Two statement texts equal but for the values of numbers that start after a byte that
    cannot continue a name (so `aid = 1` and `aid = 20` match; `t1` and `t2` do not): both
    normalize to the same statement. From a double quote on, every byte must be equal (a quoted
    name keeps its digits). False is always safe (the caller normalizes)."""
    cdef Py_ssize_t i = 0, j = 0, k
    cdef bint exact = False
    cdef unsigned long long x, look
    while True:
        # eight bytes at a time up to the first byte that differs, is a digit or a double quote:
        # only there is a closer look needed
        while i + 8 <= an and j + 8 <= bn:
            x = load8(a + i)
            look = nonzero_bytes(x ^ load8(b + j)) | digit_bytes(x) | (nonzero_bytes(x ^ (ONES * 34)) ^ HIGHS)
            if look == 0:
                i += 8
                j += 8
                continue
            k = __builtin_ctzll(look) >> 3
            i += k
            j += k
            break
        if exact:
            return an - i == bn - j and memcmp(a + i, b + j, an - i) == 0
        if i >= an or j >= bn:
            break
        if (digit(a[i]) and digit(b[j]) and (i == 0 or not word_byte(a[i - 1]))
                and (j == 0 or not word_byte(b[j - 1]))):
            i = skip_number(a, i, an)  # (the normalizer's own reading of a number)
            j = skip_number(b, j, bn)
            continue
        if a[i] != b[j]:
            # `+ -5` and `+ 7`: a minus the normalizer folds into the constant (TPC-B's deltas)
            if folded_minus(a, i, an) and digit(b[j]) and (j == 0 or not word_byte(b[j - 1])):
                i = skip_number(a, i + 1, an)
                j = skip_number(b, j, bn)
                continue
            if folded_minus(b, j, bn) and digit(a[i]) and (i == 0 or not word_byte(a[i - 1])):
                i = skip_number(a, i, an)
                j = skip_number(b, j + 1, bn)
                continue
            return False
        if a[i] == 34:
            exact = True
        i += 1
        j += 1
    return i == an and j == bn


cdef inline unsigned int shape_slot(const unsigned char *q, Py_ssize_t n, int pool) noexcept nogil:
    """The shape table's set of a statement text: a hash of its bytes before the first digit or
    minus before a digit (at most SHAPE_PREFIX), which two texts of the same shape share
    (same_shape: equal up to there), and of the pool; eight bytes at a time where none of them
    can start a number."""
    cdef unsigned long long h = 14695981039346656037ULL ^ <unsigned long long>pool
    cdef unsigned long long x
    cdef Py_ssize_t i = 0, end = n if n < SHAPE_PREFIX else SHAPE_PREFIX
    cdef unsigned char ch
    while i + 8 <= end:
        x = load8(q + i)
        if has_digit(x) or has_byte(x, 45):
            break
        h = (h ^ x) * 1099511628211ULL
        i += 8
    while i < end:
        ch = q[i]
        if digit(ch) or (ch == 45 and i + 1 < n and digit(q[i + 1])):  # (a sign: folded_minus)
            break
        h = (h ^ ch) * 1099511628211ULL
        i += 1
    h ^= h >> 29
    return <unsigned int>(h * 0x9E3779B97F4A7C15ULL >> 40) & (SHAPE_SLOTS - SHAPE_WAYS)


cdef inline void remember_shape(QLast *to, const unsigned char *q, Py_ssize_t n, int pool, long long handle,
                                unsigned char verdict) noexcept nogil:
    memcpy(to.text, q, n)
    to.len = <int>n
    to.pool = pool
    to.handle = handle
    to.verdict = verdict


cdef inline unsigned char query_verdict(const unsigned char *q, Py_ssize_t n) noexcept nogil:
    """Both keyword tests of a Query's text, as Verdict bits."""
    cdef unsigned char v = V_KNOWN
    if names_database(q, n):
        v |= V_DATABASE
    if maybe_session_state(q, n):
        v |= V_STATE
    return v


def shape_slot_py(bytes q, int pool):
    """shape_slot() for tests."""
    return shape_slot(<const unsigned char *><char *>q, len(q), pool)


def same_shape_py(bytes a, bytes b):
    """same_shape() for tests."""
    return same_shape(<const unsigned char *><char *>a, len(a), <const unsigned char *><char *>b, len(b))


cdef long long tag_rows(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    """The row count that ends a CommandComplete tag ("SELECT 5", "INSERT 0 5"), else 0."""
    cdef Py_ssize_t end = n, i, k
    cdef long long v = 0
    while end > 0 and p[end - 1] == 0:
        end -= 1
    i = end
    while i > 0 and 48 <= p[i - 1] <= 57:
        i -= 1
    if i == end or i == 0 or p[i - 1] != 32 or end - i > 18:
        return 0
    for k in range(i, end):
        v = v * 10 + (p[k] - 48)
    return v


cdef inline bint reserved_name(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    return n >= 6 and memcmp(p, b"PGMUX_", 6) == 0


class _Detached:
    """Protocol of a transport whose socket the engine took over (its close is not ours)."""

    def connection_made(self, transport):
        pass

    def connection_lost(self, exc):
        pass

    def pause_writing(self):
        pass

    def resume_writing(self):
        pass


cdef class PoolStats:
    """The counters of one pool: plain integers the engine adds to in C and SHOW STATS, the
    stats: line and /metrics read. Histograms (lists of 64 ints, pgmux.stats.histogram) are kept
    only when `histograms` is set."""

    def __init__(self):
        self.histograms = True
        self.wait_hist = [0] * 64
        self.query_hist = [0] * 64
        self.xact_hist = [0] * 64

    def __repr__(self):
        return (f"PoolStats(xact_count={self.xact_count}, query_count={self.query_count}, "
                f"bytes_received={self.bytes_received}, bytes_sent={self.bytes_sent})")


cdef class PoolCore:
    """The C side of one pgmux.pool.Pool (see _engine.pxd)."""

    def __init__(self, pool, idle, active, waiting, PoolStats stats):
        self.pool = pool
        self.idle = idle
        self.active = active
        self.waiting = waiting
        self.stats = stats
        self.enabled = True
        self.qpool = -1
        self.lifetime = 0.0
        self.check_delay = -1.0
        self.idle_append = idle.append
        self.idle_pop = idle.pop
        self.idle_popleft = idle.popleft
        self.waiting_popleft = waiting.popleft
        self.waiting_appendleft = waiting.appendleft
        self.active_add = active.add
        self.active_discard = active.discard


cdef str S_IDLE = "idle"
cdef str S_ACTIVE = "active"


cdef inline int bit_length(long long v) noexcept nogil:
    cdef int n = 0
    while v > 0:
        n += 1
        v >>= 1
    return n


cdef inline void observe(object hist, long long us):
    cdef int i = bit_length(us)
    hist[i] = hist[i] + 1


class _SocketInfo:
    """What get_extra_info('socket') answers for an adopted link: enough for getsockopt
    (SO_PEERCRED, SHOW CLIENTS) without a socket object that would close the engine's fd."""

    def __init__(self, int fd, int family):
        self._fd = fd
        self.family = family

    def fileno(self):
        return self._fd

    def getsockopt(self, *args):
        with socket.fromfd(self._fd, self.family, socket.SOCK_STREAM) as s:
            return s.getsockopt(*args)

    def setsockopt(self, *args):
        with socket.fromfd(self._fd, self.family, socket.SOCK_STREAM) as s:
            s.setsockopt(*args)


cdef class TlsState:
    """A TLS link's ssl.SSLObject and its two MemoryBIOs; `waiter`: the handshake's future. Once
    the handshake is over, `nat` holds that object's SSL and BIOs for OpenSSL calls from C
    (_ossl.pyx); when it could not (nat.ssl NULL), records go through the SSLObject's methods."""


cdef class Link:
    """One socket of pgmux's: base class of ClientConnection and ServerConnection."""

    def __cinit__(self, *args, **kwargs):
        self.fd = -1
        self.status = 73  # 'I'
        self.max_packet_size = 0x7FFFFFFF
        self.q_unnamed = -1

    def __dealloc__(self):
        if self.rbuf != NULL:
            free(self.rbuf)
        if self.obuf != NULL:
            free(self.obuf)
        if self.ring != NULL:
            free(self.ring)
        if self.q != NULL:
            free(self.q)
        if self.qlast != NULL:
            free(self.qlast)

    # ------------------------------------------------------------ read-only views for Python

    @property
    def adopted(self):
        """The engine owns this link's socket."""
        return self.eng is not None

    @property
    def fast(self):
        return self.mode == MODE_FAST

    @property
    def tls_native(self):
        """A TLS link whose records the engine reads and writes with OpenSSL from C."""
        return self.tls is not None and (<TlsState>self.tls).nat.ssl != NULL

    @property
    def carried(self):
        """(bytes kept in C between reads, body bytes still to come): SHOW SOCKETS and is_clean."""
        return self.rkeep, self.rskip

    # ------------------------------------------------------------ output

    cdef int _queue(self, const unsigned char *p, Py_ssize_t n) except -1:
        cdef Py_ssize_t used = self.otail - self.ohead
        cdef Py_ssize_t cap
        cdef unsigned char *nb
        if self.ohead and self.otail + n > self.ocap:
            memmove(self.obuf, self.obuf + self.ohead, used)
            self.ohead = 0
            self.otail = used
        grow(&self.obuf, &self.ocap, self.otail + n)
        memcpy(self.obuf + self.otail, p, n)
        self.otail += n
        return 0

    cdef int send_bytes(self, const unsigned char *p, Py_ssize_t n) except -1:
        """Send p[0:n] (encrypted first on a TLS link)."""
        cdef TlsState st
        if n <= 0 or self.fd < 0 or self.closing:
            return 0
        if self.tls is not None and (<TlsState>self.tls).live:
            st = <TlsState>self.tls
            if st.nat.ssl != NULL:
                if tls_write(&st.nat, p, n) != 0:
                    self.eng._close_link(self, ConnectionResetError(f"TLS error: {tls_error_text()}"))
                    return 0
                return self.eng._native_flush(self, st)
            st.sslobj.write(PyMemoryView_FromMemory(<char *>p, n, PyBUF_READ))
            data = st.outgoing.read()
            return self._send_raw(<const unsigned char *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        return self._send_raw(p, n)

    cdef int _send_raw(self, const unsigned char *p, Py_ssize_t n) except -1:
        """Send now what the socket takes, queue the rest (EPOLLOUT drains it)."""
        cdef ssize_t r
        if n <= 0 or self.fd < 0 or self.closing:
            return 0
        if self.otail == self.ohead:
            while True:
                r = send(self.fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT)
                if r >= 0:
                    break
                if errno == EINTR:
                    continue
                if errno == EAGAIN:
                    r = 0
                    break
                # the peer is gone: the read side sees it too; close now
                self.eng._close_link(self, ConnectionResetError(errno, os.strerror(errno)))
                return 0
            if r == n:
                return 0
            p += r
            n -= r
        self._queue(p, n)
        self.eng._update_events(self)
        if not self.write_paused_sent and self.otail - self.ohead > HIGH_WATER:
            self.write_paused_sent = True
            if self.eng.in_run:
                self.eng.paused_now.append(self)  # called once the walk in progress is over
            else:
                self.pause_writing()
        return 0

    cdef int _keep_bytes(self, const unsigned char *p, Py_ssize_t n) except -1:
        """Keep p[0:n] at the front of this link's own buffer for the next read."""
        cdef Py_ssize_t cap
        cdef unsigned char *nb
        if n == 0:
            self.rkeep = 0
            if self.rbuf != NULL and self.rcap > MIN_KEEP:
                free(self.rbuf)
                self.rbuf = NULL
                self.rcap = 0
            return 0
        if p == self.rbuf:
            self.rkeep = n
            return 0
        if self.rbuf != NULL and p > self.rbuf and p < self.rbuf + self.rcap:
            memmove(self.rbuf, p, n)
            self.rkeep = n
            return 0
        grow(&self.rbuf, &self.rcap, 2 * n)
        memcpy(self.rbuf, p, n)
        self.rkeep = n
        return 0

    # ------------------------------------------------------------ requests in flight (tracked links)
    # The kinds of the requests a tracked fast link forwarded and whose answers are still to come,
    # oldest first: ResponseTracker's queue while it holds nothing but PASS entries.

    cdef int ring_push(self, unsigned char kind) except -1:
        cdef int cap, i
        cdef unsigned char *nr
        if self.ring_len == self.ring_cap:
            cap = self.ring_cap * 2 if self.ring_cap else 64
            nr = <unsigned char *>malloc(cap)
            if nr == NULL:
                raise MemoryError()
            for i in range(self.ring_len):
                nr[i] = self.ring[(self.ring_head + i) % self.ring_cap]
            free(self.ring)
            self.ring = nr
            self.ring_cap = cap
            self.ring_head = 0
        self.ring[(self.ring_head + self.ring_len) % self.ring_cap] = kind
        self.ring_len += 1
        return 0

    cdef inline int ring_front(self) noexcept:
        return self.ring[self.ring_head] if self.ring_len else -1

    cdef inline void ring_pop(self) noexcept:
        if self.ring_len:
            self.ring_head = (self.ring_head + 1) % self.ring_cap
            self.ring_len -= 1

    cdef void ring_drop_syncs(self) noexcept:
        """COPY IN started or ended: PostgreSQL ignores the Syncs queued since."""
        cdef int i, n = 0
        cdef unsigned char k
        for i in range(self.ring_len):
            k = self.ring[(self.ring_head + i) % self.ring_cap]
            if k != 83:
                self.ring[(self.ring_head + n) % self.ring_cap] = k
                n += 1
        self.ring_len = n

    cdef bytes ring_take(self):
        """The kinds in flight, oldest first; the ring is emptied."""
        cdef int i
        out = bytearray(self.ring_len)
        for i in range(self.ring_len):
            out[i] = self.ring[(self.ring_head + i) % self.ring_cap]
        self.ring_len = 0
        self.ring_head = 0
        return bytes(out)

    # ------------------------------------------------------------ link state (server side)

    cdef void note_request(self, int kind, double now):
        """The client sent a Query, FunctionCall or Sync (`kind`): one more ReadyForQuery to wait
        for, the latest request's kind (COPY IN accounting), the query and transaction timers,
        and the statement it runs for per-query statistics (`q.pending`)."""
        cdef QLink *q = self.q
        cdef int i
        if q != NULL:
            while q.len > self.outstanding:  # realign after requests that got no ReadyForQuery
                q.head = (q.head + 1) % QRING
                q.len -= 1
            if q.len == QRING:  # more in flight than kept: the oldest is not counted
                q.head = (q.head + 1) % QRING
                q.len -= 1
            while q.len < self.outstanding and q.len < QRING - 1:  # in flight before q existed
                i = (q.head + q.len) % QRING
                q.handles[i] = -1
                q.len += 1
            i = (q.head + q.len) % QRING
            q.handles[i] = q.pending
            q.started[i] = now
            q.len += 1
            q.pending = -1
        self.outstanding += 1
        self.last_start = kind
        if not self.query_start:
            self.query_start = now
            self.request_time = now
            if self.status == 73 and not self.xact_start:
                self.xact_start = now

    cdef void ready_for_query(self, int status, double now):
        """One ReadyForQuery: outstanding requests, statistics, transaction status."""
        cdef PoolStats stats = self.link_stats
        cdef long long us
        cdef double started = self.query_start
        cdef QLink *q = self.q
        if q != NULL:
            if q.len:
                if q.handles[q.head] >= 0 and self.eng is not None and self.core is not None:
                    self.eng.qstats.record(q.handles[q.head], self.core.qpool,
                                           <long long>((now - q.started[q.head]) * 1000000), q.rows, q.error,
                                           q.wait_us)
                    q.wait_us = 0
                q.head = (q.head + 1) % QRING
                q.len -= 1
            q.rows = 0
            q.error = False
            if self.outstanding <= 1:
                q.len = 0
        if self.outstanding:
            self.outstanding -= 1
        if stats is not None:
            stats.query_count += 1
            if started:
                us = <long long>((now - started) * 1000000)
                stats.query_time_us += us
                if stats.histograms:
                    observe(stats.query_hist, us)
        self.query_start = 0.0
        if status == 73:  # 'I'
            if self.xact_start:
                if stats is not None:
                    stats.xact_count += 1
                    us = <long long>((now - self.xact_start) * 1000000)
                    stats.xact_time_us += us
                    if stats.histograms:
                        observe(stats.xact_hist, us)
                self.xact_start = 0.0
            elif self.status != 73 and stats is not None:
                stats.xact_count += 1
        elif not self.xact_start and self.status == 73:
            self.xact_start = started if started else now
        self.status = status
        self.last_used = now

    cdef void copy_started(self):
        """CopyInResponse: PostgreSQL ignores the Syncs it reads during COPY IN (see
        ServerConnection._copy_in, the same rule for the slow path)."""
        cdef int ignored
        if self.copy_in < 0:
            self.copy_in = 0
            return
        ignored = self.outstanding - (1 if self.last_start == 81 else 0)  # a Query gets its own
        if ignored > 0:
            self.outstanding -= ignored
        self.copy_in = 1
        self.copy_base = self.outstanding

    cdef void copy_end(self):
        """The client sent CopyDone or CopyFail."""
        if self.copy_in > 0:
            self.outstanding = self.copy_base
        self.copy_in = -1 if self.copy_in == 0 else 0

    # ------------------------------------------------------------ per-query statistics

    cdef QLink *qlink(self) noexcept:
        if self.q == NULL:
            self.q = <QLink *>calloc(1, sizeof(QLink))
            if self.q != NULL:
                self.q.pending = self.q.statement = -1
        return self.q

    cdef inline QLink *qlink_for(self, long long handle) noexcept:
        """The QLink to note `handle` in: made for a statement, not for "none" (-1)."""
        if self.q == NULL and handle < 0:
            return NULL
        return self.qlink()

    cdef void q_pending(self, long long handle) noexcept:
        """Server: the request being built runs this statement (a QueryStats handle): a Query,
        or an Execute of the statement q_statement() named."""
        cdef QLink *q = self.qlink_for(handle)
        if q != NULL:
            q.pending = handle

    cdef void q_statement(self, long long handle) noexcept:
        """Server: a Parse or Bind of this statement; it counts once an Execute runs it (a lone
        Parse + Sync, as PQprepare sends, is no call)."""
        cdef QLink *q = self.qlink_for(handle)
        if q != NULL:
            q.statement = handle

    cdef int parse_noted(self, Link server, int pool, const unsigned char *name, Py_ssize_t tl,
                         const unsigned char *text, Py_ssize_t nl) except -1:
        """Client: a Parse of statement `name` (tl bytes, 0: unnamed) with this text, going to
        `server` (None: answered by pgmux): an Execute of it, now or after a Bind, counts under
        the text. The one place both paths note a Parse (the walk, and note_parse for Python's)."""
        cdef long long h = self.eng._statement_handle(self, pool, text, nl)
        if server is not None:
            server.q_statement(h)
        if tl:
            self.name_query(name, tl, h)
        else:
            self.q_unnamed = h
        return 0

    cdef int name_query(self, const unsigned char *name, Py_ssize_t n, long long handle) except -1:
        """Client: a named Parse; a later Bind of the name runs this statement."""
        names = self.query_names
        if names is None:
            names = self.query_names = {}
        elif len(names) >= 1000:  # a client that never reuses its names: keep it bounded
            names.clear()
        names[PyBytes_FromStringAndSize(<char *>name, n)] = handle
        return 0

    cdef long long bind_query(self, const unsigned char *body, Py_ssize_t blen) except? -2:
        """Client: the statement a Bind body (maybe cut short) runs: its named one, else the
        unnamed statement's."""
        cdef Py_ssize_t name_pos, name_len
        name_pos = cstr_len(body, blen)
        if name_pos < 0:
            return self.q_unnamed
        name_pos += 1
        name_len = cstr_len(body + name_pos, blen - name_pos)
        if name_len <= 0:
            return self.q_unnamed
        if self.query_names is None:
            return -1
        return self.query_names.get(self.statement_name(body + name_pos, name_len), -1)

    cdef int _c_login_over(self) except -1:
        """The engine's C login of this client is over (Python has it, or it is logged in); the
        bytes it kept go too."""
        self.engine_login = CL_NONE
        self.login_secret = None
        return self._keep_bytes(self.rbuf, 0)

    cdef bytes statement_name(self, const unsigned char *name, Py_ssize_t n):
        """Client: name[0:n] as a bytes object; the same one as for its last Bind while the name
        repeats (no allocation, and its hash is kept for the dict lookups)."""
        cdef bytes last = self.bind_name
        if last is not None and PyBytes_GET_SIZE(last) == n and memcmp(PyBytes_AS_STRING(last), name, n) == 0:
            return last
        last = PyBytes_FromStringAndSize(<char *>name, n)
        self.bind_name = last
        return last

    def note_query(self, const unsigned char[::1] buf, Py_ssize_t start, Py_ssize_t stop):
        """Server, Python's paths: the client's Query text is buf[start:stop]."""
        cdef QueryStats qs = self.eng.qstats if self.eng is not None else None
        if qs is None or not qs.enabled or self.core is None or self.core.qpool < 0:
            return
        stop = min(stop, buf.shape[0])
        if 0 <= start < stop:
            self.q_pending(self.eng._statement_handle(self.client, self.core.qpool, &buf[start], stop - start))
        else:
            self.q_pending(self.eng._statement_handle(self.client, self.core.qpool, <const unsigned char *>b"", 0))

    def note_parse(self, Link server, const unsigned char[::1] buf, Py_ssize_t start, Py_ssize_t stop):
        """Client, Python's paths: a Parse whose body is buf[start:stop], going to `server` (None:
        answered by pgmux, as a lone Parse is before any server is linked)."""
        cdef QueryStats qs = self.eng.qstats if self.eng is not None else None
        cdef Py_ssize_t tl, nl
        stop = min(stop, buf.shape[0])
        if qs is None or not qs.enabled or self.core is None or self.core.qpool < 0 or not 0 <= start < stop:
            return
        tl = cstr_len(&buf[start], stop - start)
        if tl < 0:
            return
        nl = cstr_len(&buf[start] + tl + 1, stop - start - tl - 1)
        if nl >= 0:
            self.parse_noted(server, self.core.qpool, &buf[start], tl, &buf[start] + tl + 1, nl)

    def note_bind(self, Link server, const unsigned char[::1] buf, Py_ssize_t start, Py_ssize_t stop):
        """Client, Python's paths: a Bind whose body is buf[start:stop] (perhaps cut short)."""
        stop = min(stop, buf.shape[0])
        if server.q == NULL and (server.eng is None or not server.eng.qstats.enabled):
            return
        if 0 <= start < stop:
            server.q_statement(self.bind_query(&buf[start], stop - start))
        else:
            server.q_statement(self.q_unnamed)

    def note_execute(self):
        """Server, Python's paths: an Execute runs the statement of the latest Parse or Bind."""
        if self.q != NULL:
            self.q.pending = self.q.statement

    def note_rows(self, const unsigned char[::1] buf, Py_ssize_t start, Py_ssize_t stop):
        """Server, Python's paths: a CommandComplete tag in buf[start:stop]."""
        stop = min(stop, buf.shape[0])
        if self.q != NULL and 0 <= start < stop:
            self.q.rows += tag_rows(&buf[start], stop - start)

    def note_error(self):
        """Server, Python's paths: an ErrorResponse for the request at the front."""
        if self.q != NULL:
            self.q.error = True

    @property
    def query_ring(self):
        """Server: (handle of the request being built, handles of the requests in flight), or None
        before its first statement (for tests)."""
        cdef QLink *q = self.q
        if q == NULL:
            return None
        return q.pending, [q.handles[(q.head + i) % QRING] for i in range(q.len)]

    def note_wait(self, long long us):
        """Server: its new client waited `us` for it; counted with the client's next statement."""
        cdef QLink *q
        if self.eng is not None and self.eng.qstats.enabled:
            q = self.qlink()
            if q != NULL:
                q.wait_us = us

    # The same changes for Python's own paths (slow links, pgmux's queries): one implementation.

    def request_sent(self, int kind):
        """A Query (81), Sync (83) or FunctionCall (70) went to this server."""
        self.note_request(kind, monotonic())

    def ready(self, int status):
        """A ReadyForQuery with this transaction status arrived from this server."""
        self.ready_for_query(status, monotonic())

    def copy_started_py(self):
        self.copy_started()

    def copy_end_py(self):
        self.copy_end()

    def reclaim(self):
        """Bytes the engine holds for a slow link (a client it queued) go to the Python
        protocol's buffer (keep), and reading resumes: Python forwards them itself."""
        cdef Py_ssize_t k = self.rkeep
        if self.mode == MODE_FAST:
            return
        if k:
            carried_to_python(self, self.rbuf, k)
            self._keep_bytes(self.rbuf, 0)
        if self.held and self.eng is not None:
            self.eng._unhold(self)

    def to_slow(self):
        """Leave the fast path (this link and its peer), handing carried bytes to Python."""
        if self.eng is not None:
            self.eng.unlink(self)


cdef class EngineTransport:
    """What asyncio.Transport offers pgmux's protocols, over a socket the engine owns."""

    cdef Link link
    cdef int family

    def __init__(self, Link link, int family):
        self.link = link
        self.family = family

    def write(self, data):
        cdef const unsigned char[::1] view
        if not data:
            return
        if isinstance(data, memoryview) and not data.contiguous:
            data = bytes(data)
        view = data
        self.link.send_bytes(&view[0], view.shape[0])

    def writelines(self, lines):
        self.write(b"".join(lines))

    def get_write_buffer_size(self):
        return self.link.otail - self.link.ohead

    def get_write_buffer_limits(self):
        return (LOW_WATER, HIGH_WATER)

    def pause_reading(self):
        self.link.reading_paused = True
        if self.link.eng is not None:
            self.link.eng._update_events(self.link)

    def resume_reading(self):
        self.link.reading_paused = False
        if self.link.eng is not None:
            self.link.eng._update_events(self.link)

    def is_reading(self):
        return not self.link.reading_paused and self.link.fd >= 0

    def is_closing(self):
        return self.link.fd < 0 or self.link.closing

    def close(self):
        """Stop reading; close once what is queued has been sent."""
        cdef Link link = self.link
        if link.fd < 0 or link.closing:
            return
        if link.otail == link.ohead:
            link.eng._end_link(link)
        else:
            link.closing = True
            link.eng._update_events(link)

    def abort(self):
        if self.link.fd >= 0:
            self.link.eng._close_link(self.link, None)


    def get_extra_info(self, name, default=None):
        """Asked for rarely (SHOW CLIENTS, logs): worked out from the fd each time, so that an
        idle client holds nothing for it."""
        cdef int fd = self.link.fd
        cdef TlsState st = <TlsState>self.link.tls if self.link.tls is not None else None
        if st is not None and st.live and name in ("ssl_object", "peercert", "cipher"):
            if name == "ssl_object":
                return st.sslobj
            return st.sslobj.getpeercert() if name == "peercert" else st.sslobj.cipher()
        if fd < 0 or name not in ("socket", "peername", "sockname"):
            return default
        info = _SocketInfo(fd, self.family)
        if name == "socket":
            return info
        try:
            with socket.fromfd(fd, self.family, socket.SOCK_STREAM) as sock:
                return sock.getpeername() if name == "peername" else sock.getsockname()
        except OSError:
            return default

    def get_protocol(self):
        return self.link

    def __repr__(self):
        return f"<EngineTransport fd={self.link.fd}>"


cdef class Statement:
    """One distinct (query, parameter types), shared by every client that prepares it
    (pgmux.protocol.prepared.StatementRegistry). A C struct: a tracked Bind or Describe reads its
    id and server-side name without a Python attribute lookup (Engine._statement_ref)."""

    def __init__(self, id, bytes server_name, bytes tail):
        self.id = id
        self.server_name = server_name
        self.tail = tail

    def parse_message(self):
        """The Parse that prepares it on a server, under its server-side name."""
        body = self.server_name + b"\0" + self.tail
        return b"P" + (len(body) + 4).to_bytes(4, "big") + body

    def __repr__(self):
        return f"Statement(id={self.id!r}, server_name={self.server_name!r}, tail={self.tail!r})"


cdef class Acceptor(Link):
    """A listening socket in the engine's epoll set (Engine.listen): each ready connection is
    accepted here, gets the TCP options Python chose, and is handed to `on_accept` with its
    addresses, so that a login starts with no event-loop transport to make and take apart."""

    def set_options(self, options):
        """(level, option, int value) triples set on each accepted socket (tcp_* settings)."""
        cdef int i = 0
        for level, option, value in options:
            if i + 3 > MAX_ACCEPT_OPTIONS:
                raise ValueError("too many socket options")
            self.opts[i] = level
            self.opts[i + 1] = option
            self.opts[i + 2] = value
            i += 3
        self.nopts = i


# IPv4 addresses as text, the last few seen (a direct-mapped cache: an accept formats two
# addresses, and inet_ntop's sprintf costs ~1,700 instructions each, while a pooler's clients
# come from few hosts). Strong references to interned strings; never freed (at most V4_TEXTS).
cdef enum:
    V4_TEXTS = 64
cdef unsigned int v4_addr[V4_TEXTS]
cdef PyObject *v4_text[V4_TEXTS]


cdef object _v4_host(unsigned int addr):
    """The dotted text of an IPv4 address (network byte order), interned; None if it cannot be made."""
    cdef char text[16]
    cdef unsigned int slot = ((addr * 2654435761u) >> 26) & (V4_TEXTS - 1)
    cdef object host
    if v4_text[slot] != NULL and v4_addr[slot] == addr:
        return <object>v4_text[slot]
    if inet_ntop(AF_INET, &addr, text, sizeof(text)) == NULL:
        return None
    host = PyUnicode_InternFromString(text)
    Py_INCREF(host)
    Py_XDECREF(v4_text[slot])
    v4_text[slot] = <PyObject *>host
    v4_addr[slot] = addr
    return host


cdef object _address(sockaddr_storage *sa):
    """(host, port) as Python's getpeername gives them for IPv4/IPv6 (two items), else None."""
    cdef char text[64]
    if sa.ss_family == AF_INET:
        host = _v4_host((<sockaddr_in *>sa).sin_addr.s_addr)
        if host is None:
            return None
        return (host, ntohs((<sockaddr_in *>sa).sin_port))
    if sa.ss_family == AF_INET6:
        if inet_ntop(AF_INET6, &(<sockaddr_in6 *>sa).sin6_addr, text, sizeof(text)) == NULL:
            return None
        return (text.decode("ascii"), ntohs((<sockaddr_in6 *>sa).sin6_port))
    return None


cdef class Engine:
    """The epoll set: `run()` is the asyncio reader callback of `epfd`."""

    def __cinit__(self):
        self.epfd = -1
        self.spare_fd = -1
        self.table = NULL
        self.shared = NULL

    def __init__(self, loop):
        self.loop = loop
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, os.strerror(errno))
        self.shared = <unsigned char *>malloc(SHARED_SIZE)
        self.tlsplain = <unsigned char *>malloc(SHARED_SIZE)
        self.tlsout = <unsigned char *>malloc(SHARED_SIZE)
        if self.shared == NULL or self.tlsplain == NULL or self.tlsout == NULL:
            raise MemoryError()
        self.native_tls = True
        self.next_gen = 1
        self.paused_now = []
        self.qstats = QueryStats(5000)
        self.login_routes = {}
        # libuv's answer to EMFILE: a spare descriptor given back for a moment to accept and close
        # one connection, so that a full process does not spin on a ready listening socket.
        self.spare_fd = open(b"/dev/null", O_RDONLY | O_CLOEXEC)

    def __dealloc__(self):
        cdef int i
        if self.table != NULL:
            for i in range(self.table_size):
                if self.table[i] != NULL:
                    if (<Link>self.table[i]).fd == i and type(<object>self.table[i]) is not Acceptor:
                        close(i)
                        (<Link>self.table[i]).fd = -1
                    Py_XDECREF(self.table[i])
            free(self.table)
        if self.shared != NULL:
            free(self.shared)
        if self.tlsplain != NULL:
            free(self.tlsplain)
        if self.tlsout != NULL:
            free(self.tlsout)
        if self.scratch != NULL:
            free(self.scratch)
        if self.shapes != NULL:
            for i in range(SHAPE_SLOTS):
                free(self.shapes[i].text)
            free(self.shapes)
        if self.epfd >= 0:
            close(self.epfd)
        if self.spare_fd >= 0:
            close(self.spare_fd)

    def close(self):
        """Stop: the loop no longer calls run(); the owned sockets stay until their links close."""
        self.stopped = True
        if self.epfd >= 0:
            try:
                self.loop.remove_reader(self.epfd)
            except Exception:
                pass

    def start(self):
        self.loop.add_reader(self.epfd, self.run)

    # ------------------------------------------------------------ listening sockets

    def listen(self, int fd, on_accept, on_error, options=()):
        """Accept on a listening socket (non-blocking; it stays the caller's: unlisten() before
        closing it). For each connection: `on_accept(fd, peer, local)`, the fd non-blocking and
        the caller's to adopt (adopt_fd) or close; `peer`/`local` are (host, port) for TCP, None
        for a Unix socket. `on_error(errno)` when accept fails for want of descriptors or memory."""
        cdef Acceptor a = Acceptor.__new__(Acceptor)
        if fd < 0:
            raise ValueError(f"bad fd {fd}")
        a.set_options(options)
        a.on_accept = on_accept
        a.on_error = on_error
        a.fd = fd
        a.eng = self
        self._register(a)
        return a

    def unlisten(self, Acceptor a):
        """Stop accepting on `a`'s socket (not closed: it is the caller's)."""
        cdef int fd = a.fd
        if fd < 0:
            return
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, NULL)
        a.fd = -1
        a.eng = None
        if fd < self.table_size and self.table[fd] == <PyObject *>a:
            self.table[fd] = NULL
            Py_XDECREF(<PyObject *>a)

    cdef int _accept(self, Acceptor a) except -1:
        cdef sockaddr_storage peer, local
        cdef socklen_t plen, llen
        cdef int fd, err, i, n = 0
        while n < ACCEPT_BATCH and a.fd >= 0:
            plen = sizeof(peer)
            fd = accept4(a.fd, <sockaddr *>&peer, &plen, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                err = errno
                if err == EINTR or err == ECONNABORTED:
                    continue
                if err == EAGAIN:
                    return 0
                if (err == EMFILE or err == ENFILE) and self.spare_fd >= 0:
                    close(self.spare_fd)
                    fd = accept4(a.fd, NULL, NULL, SOCK_CLOEXEC)
                    if fd >= 0:
                        close(fd)
                    self.spare_fd = open(b"/dev/null", O_RDONLY | O_CLOEXEC)
                try:
                    a.on_error(err)
                except Exception as exc:
                    self.loop.call_exception_handler({"message": "pgmux engine: error in accept", "exception": exc})
                return 0
            n += 1
            for i in range(0, a.nopts, 3):
                setsockopt(fd, a.opts[i], a.opts[i + 1], &a.opts[i + 2], sizeof(int))
            local_address = None
            if peer.ss_family != AF_UNIX:
                llen = sizeof(local)
                if getsockname(fd, <sockaddr *>&local, &llen) == 0:
                    local_address = _address(&local)
            try:
                a.on_accept(fd, _address(&peer), local_address)
            except Exception as exc:
                if fd >= self.table_size or self.table[fd] == NULL:
                    close(fd)  # not adopted
                self.loop.call_exception_handler({"message": "pgmux engine: error in accept", "exception": exc})
        return 0

    # ------------------------------------------------------------ adoption

    def adopt(self, Link link, transport):
        """Take over the socket of a logged-in link from its asyncio transport; returns the
        EngineTransport that replaces it. Nothing may be queued in the old transport."""
        if link.eng is not None:
            raise ValueError("already adopted")
        sock = transport.get_extra_info("socket")
        if sock is None:
            return None  # not a socket (an in-process harness): the link stays where it is
        family = sock.family
        fd = os.dup(sock.fileno())
        transport.set_protocol(_Detached())
        transport.abort()
        os.set_blocking(fd, False)
        link.fd = fd
        link.eng = self
        self._register(link)
        t = EngineTransport(link, family)
        return t

    def adopt_fd(self, Link link, int fd, int family=socket.AF_UNIX):
        """Take over a connected non-blocking socket fd (tests, fuzzing, future logins)."""
        if link.eng is not None:
            raise ValueError("already adopted")
        if fd < 0:
            raise ValueError(f"bad fd {fd}")
        link.fd = fd
        link.eng = self
        self._register(link)
        t = EngineTransport(link, family)
        return t

    cdef int _register(self, Link link) except -1:
        cdef epoll_event ev
        cdef int fd = link.fd
        cdef int size
        cdef PyObject **nt
        if fd >= self.table_size:
            size = self.table_size * 2 if self.table_size else 1024
            while size <= fd:
                size *= 2
            nt = <PyObject **>realloc(self.table, size * sizeof(PyObject *))
            if nt == NULL:
                raise MemoryError()
            for i in range(self.table_size, size):
                nt[i] = NULL
            self.table = nt
            self.table_size = size
        if self.table[fd] != NULL:  # cannot happen: an fd is unregistered before it is closed
            raise RuntimeError(f"engine: fd {fd} already registered")
        self.next_gen += 1
        link.gen = self.next_gen
        Py_INCREF(link)
        self.table[fd] = <PyObject *>link
        ev.events = EPOLLIN
        ev.data.u64 = (<unsigned long long>link.gen << 32) | <unsigned int>fd
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            self.table[fd] = NULL
            Py_XDECREF(<PyObject *>link)
            link.fd = -1
            raise OSError(errno, os.strerror(errno))
        link.registered = EPOLLIN
        return 0

    cdef void _update_events(self, Link link):
        cdef epoll_event ev
        cdef unsigned int want = 0
        if link.fd < 0:
            return
        if not link.reading_paused and not link.closing and not link.held_full:
            want |= EPOLLIN
        if link.otail != link.ohead:
            want |= EPOLLOUT
        if want == link.registered:
            return
        ev.events = want
        ev.data.u64 = (<unsigned long long>link.gen << 32) | <unsigned int>link.fd
        epoll_ctl(self.epfd, EPOLL_CTL_MOD, link.fd, &ev)
        link.registered = want

    cdef int _close_link(self, Link link, object exc) except -1:
        """Unregister, then close: the fd number may be reused from here on, so the table slot
        is cleared first and the link keeps fd = -1. connection_lost follows from the loop
        (not for a ghost: Python was told when its link closed)."""
        cdef int fd = link.fd
        cdef bint told = link.lingering
        if fd < 0:
            return 0
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, NULL)
        link.fd = -1
        link.closing = False
        link.lingering = False
        link.ohead = link.otail = 0
        if fd < self.table_size and self.table[fd] == <PyObject *>link:
            self.table[fd] = NULL
            close(fd)
            if not told:
                self.loop.call_soon(link.connection_lost, exc)
            Py_XDECREF(<PyObject *>link)  # (the call_soon handle holds the link now)
        else:
            close(fd)
            if not told:
                self.loop.call_soon(link.connection_lost, exc)
        return 0

    cdef int _end_link(self, Link link) except -1:
        """A close whose output went out. A `linger` link sends a FIN and is closed for Python
        (connection_lost, fd -1); its socket passes to a bare Link of its own (a "ghost": no
        buffers, no protocol object kept alive) that reads and drops what the peer still sends
        until the peer closes too, LINGER_BYTES came, or LINGER_SECONDS passed (_linger_over)."""
        cdef int fd = link.fd
        cdef Link ghost
        cdef epoll_event ev
        if not link.linger or fd < 0 or fd >= self.table_size or self.table[fd] != <PyObject *>link:
            return self._close_link(link, None)
        if shutdown(fd, SHUT_WR) != 0:
            return self._close_link(link, None)
        ghost = Link.__new__(Link)
        ghost.eng = self
        ghost.fd = fd
        ghost.lingering = True
        ghost.rskip = LINGER_BYTES  # (a ghost parses nothing: this is its budget of bytes to drop)
        self.next_gen += 1
        ghost.gen = self.next_gen
        ev.events = EPOLLIN
        ev.data.u64 = (<unsigned long long>ghost.gen << 32) | <unsigned int>fd
        if epoll_ctl(self.epfd, EPOLL_CTL_MOD, fd, &ev) != 0:
            return self._close_link(link, None)
        ghost.registered = EPOLLIN
        Py_INCREF(ghost)
        self.table[fd] = <PyObject *>ghost
        link.fd = -1
        link.closing = False
        link.ohead = link.otail = 0
        self.loop.call_soon(link.connection_lost, None)
        self.loop.call_later(LINGER_SECONDS, self._linger_over, ghost, ghost.gen)
        Py_XDECREF(<PyObject *>link)  # the table's reference (the caller and call_soon hold others)
        return 0

    def _linger_over(self, Link link, unsigned int gen):
        if link.lingering and link.gen == gen:
            self._close_link(link, None)

    cdef int _read_lingering(self, Link link) except -1:
        cdef ssize_t r
        while True:
            r = recv(link.fd, self.shared, SHARED_SIZE, MSG_DONTWAIT)
            if r > 0:
                link.rskip -= r
                if link.rskip < 0:
                    return self._close_link(link, None)  # still streaming: reset it
                continue
            if r < 0 and errno == EINTR:
                continue
            if r < 0 and errno == EAGAIN:
                return 0
            return self._close_link(link, None)  # EOF or an error: done

    cdef int _flush(self, Link link) except -1:
        cdef ssize_t r
        while link.otail > link.ohead and link.fd >= 0:
            r = send(link.fd, link.obuf + link.ohead, link.otail - link.ohead, MSG_NOSIGNAL | MSG_DONTWAIT)
            if r < 0:
                if errno == EINTR:
                    continue
                if errno == EAGAIN:
                    break
                self._close_link(link, ConnectionResetError(errno, os.strerror(errno)))
                return 0
            link.ohead += r
        if link.fd < 0:
            return 0
        if link.ohead == link.otail:
            link.ohead = link.otail = 0
            if link.ocap > 4 * MIN_KEEP:
                free(link.obuf)
                link.obuf = NULL
                link.ocap = 0
            if link.closing:
                self._end_link(link)
                return 0
        self._update_events(link)
        if link.write_paused_sent and link.otail - link.ohead <= LOW_WATER:
            link.write_paused_sent = False
            link.resume_writing()
        return 0

    # ------------------------------------------------------------ the loop's callback

    def enable_hold(self):
        """Hold the loop while the engine's sockets keep it busy (run() waits in its own epoll_wait,
        with libuv's fd in its set, instead of returning to the loop's): one epoll_wait per
        wake-up instead of two. uvloop only, and only when its layout is the one expected: the
        Loop's first field is its uv_loop_t, whose `data` points back at the Loop and whose
        backend fd is the one the Loop reports. True when enabled."""
        cdef void *lib
        cdef void *uvl
        cdef uv_loop_int_fn backend_fd
        cdef uv_walk_fn walk
        cdef CheckWalk w
        try:
            import uvloop.loop as uvloop_loop
        except ImportError:
            return False
        loop = self.loop
        if not isinstance(loop, uvloop_loop.Loop):
            return False
        lib = dlopen(os.fsencode(uvloop_loop.__file__), RTLD_NOW | RTLD_NOLOAD)
        if lib == NULL:
            return False
        backend_fd = <uv_loop_int_fn>dlsym(lib, b"uv_backend_fd")
        walk = <uv_walk_fn>dlsym(lib, b"uv_walk")
        self.uv_update_time = <uv_loop_fn>dlsym(lib, b"uv_update_time")
        self.uv_backend_timeout = <uv_loop_int_fn>dlsym(lib, b"uv_backend_timeout")
        self.uv_is_active = <uv_handle_int_fn>dlsym(lib, b"uv_is_active")
        if (backend_fd == NULL or walk == NULL or self.uv_update_time == NULL
                or self.uv_backend_timeout == NULL or self.uv_is_active == NULL):
            return False
        # cdef class Loop: PyObject_HEAD, its vtable, then `uv_loop_t *uvloop` (uvloop/loop.pxd)
        uvl = (<void **>(<char *><PyObject *>loop + sizeof(PyObject) + sizeof(void *)))[0]
        if uvl == NULL or (<void **>uvl)[0] != <void *><PyObject *>loop:  # uv_loop_t.data
            return False
        if backend_fd(uvl) != loop._get_backend_id():
            return False
        w.out = self.uv_checks
        w.n = 0
        walk(uvl, _collect_checks, &w)
        self.n_checks = w.n
        self.uvl = uvl
        self.uvfd = backend_fd(uvl)
        self.quiet_need = 1
        self.hold = True
        return True

    def run(self):
        """One batch of ready sockets, all in C but for the hooks the links ask for; then, when the
        loop may be held, more batches until the loop has something to do (_hold)."""
        cdef epoll_event evs[MAX_EVENTS]
        cdef int n
        n = epoll_wait(self.epfd, evs, MAX_EVENTS, 0)
        if n <= 0:
            return
        self._batch(evs, n)
        if self.hold and not self.stopped:
            self._hold()

    cdef int _batch(self, void *evs, int n) except -1:
        self.now = monotonic()
        self.batches += 1
        self.in_run = True
        try:
            self._run_batch(evs, n)
        finally:
            self.in_run = False
            self._pause_writers()
        return 0

    cdef bint _loop_pending(self, int *timeout) noexcept:
        """The loop has work now (ready callbacks, handles to close or start, stream writes queued
        for its check phase, a stop) or a timer due: return to it. Else `timeout`: how long the
        engine may wait (the next timer, at most HOLD_MAX_MS)."""
        cdef int t, k
        self.uv_update_time(self.uvl)
        t = self.uv_backend_timeout(self.uvl)
        if t == 0:
            return True
        for k in range(self.n_checks):
            if self.uv_is_active(self.uv_checks[k]):
                return True
        timeout[0] = HOLD_MAX_MS if t < 0 or t > HOLD_MAX_MS else t
        return False

    cdef int _hold(self) except -1:
        """Wait for the engine's sockets in the engine's own epoll set, libuv's epoll fd added to
        it, until libuv's fd is ready, a timer is due or the loop has work. libuv's set holds the
        engine's fd (add_reader), and an epoll set may not end up inside itself, so that entry is
        taken out of the kernel's set for the while and put back as libuv wrote it (EPOLLIN, the
        fd as data); libuv does not look at its set meanwhile: this runs inside its callback."""
        cdef epoll_event evs[MAX_EVENTS]
        cdef epoll_event ev
        cdef int n, i, j, timeout = 0
        cdef bint loop_ready = False
        cdef unsigned long long first = self.hold_batches
        if self._loop_pending(&timeout):
            self.quiet = 0
            return 0
        # Holding costs four epoll_ctl calls; where hooks keep giving the loop work (logins), holds
        # end at once, so each one that does makes the next wait for twice as many quiet batches.
        self.quiet += 1
        if self.quiet < self.quiet_need:
            return 0
        self.quiet = 0
        if epoll_ctl(self.uvfd, EPOLL_CTL_DEL, self.epfd, NULL) < 0:
            return 0
        ev.events = EPOLLIN
        ev.data.u64 = HOLD_TAG
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, self.uvfd, &ev) < 0:
            self._rejoin_libuv()
            return 0
        self.holds += 1
        try:
            while not self.stopped:
                with nogil:
                    n = epoll_wait(self.epfd, evs, MAX_EVENTS, timeout)
                if n <= 0:
                    break  # a timer is due, or a signal came
                j = 0
                for i in range(n):
                    if evs[i].data.u64 == HOLD_TAG:
                        loop_ready = True
                    else:
                        evs[j] = evs[i]
                        j += 1
                if j:
                    self.hold_batches += 1
                    self._batch(evs, j)
                if loop_ready or self._loop_pending(&timeout):
                    break
        finally:
            self.quiet_need = min(self.quiet_need * 2, HOLD_QUIET_MAX) if self.hold_batches - first <= 1 else 1
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, self.uvfd, NULL)
            if not self.stopped:
                self._rejoin_libuv()
        return 0

    cdef void _rejoin_libuv(self) noexcept:
        """Put the engine's entry back in libuv's epoll set as libuv wrote it (uv__io_poll: the
        poll handle's EPOLLIN, the fd as data)."""
        cdef epoll_event ev
        ev.events = EPOLLIN
        ev.data.u64 = <unsigned long long>self.epfd
        epoll_ctl(self.uvfd, EPOLL_CTL_ADD, self.epfd, &ev)

    cdef int _pause_writers(self) except -1:
        cdef Link w
        while self.paused_now:
            w = self.paused_now.pop()
            if w.write_paused_sent and w.fd >= 0:
                w.pause_writing()
        return 0

    cdef int _run_batch(self, void *events_, int n) except -1:
        cdef epoll_event *evs = <epoll_event *>events_
        cdef int i, fd
        cdef unsigned int gen, events
        cdef Link link
        for i in range(n):
            fd = <int><unsigned int>evs[i].data.u64  # (the low 32 bits; the high ones hold gen)
            gen = <unsigned int>(evs[i].data.u64 >> 32)
            if fd >= self.table_size or self.table[fd] == NULL:
                continue
            link = <Link>self.table[fd]
            if link.gen != gen:
                continue  # an event for an fd closed and reused in this batch
            if type(link) is Acceptor:
                self._accept(<Acceptor>link)
                continue
            events = evs[i].events
            try:
                if events & EPOLLOUT:
                    self._flush(link)
                if link.fd >= 0 and events & (EPOLLIN | EPOLLHUP | EPOLLERR):
                    if link.held_full or link.reading_paused or link.closing:
                        if events & (EPOLLHUP | EPOLLERR):
                            self._close_link(link, None)
                    elif link.held:
                        self._read_held(link)
                    else:
                        self._on_readable(link)
                if self.paused_now:
                    self._pause_writers()
            except Exception as exc:  # a hook failed: never take the loop down
                # As asyncio does when a protocol callback raises: report it and close the link
                # (its state may be half updated); the pool then forgets it (connection_lost).
                self.loop.call_exception_handler({"message": "pgmux engine: error in a link hook",
                                                  "exception": exc, "protocol": link})
                self._close_link(link, exc)
        return 0

    cdef int _on_readable(self, Link link) except -1:
        self.reads += 1
        cdef ssize_t got
        if link.lingering:
            return self._read_lingering(link)
        if link.engine_login:
            return self._login_read(link)
        if link.tls is not None and not (<TlsState>link.tls).live:
            got = self._recv_tls(link, self.tlsplain, SHARED_SIZE)  # the handshake's next step
            if got > 0:  # the first plaintext came with the handshake's last bytes
                self._deliver_slow(link, self.tlsplain, got)
            return 0
        if link.mode == MODE_FAST and link.peer is not None:
            return self._read_fast(link)
        if (link.auto and not link.waiting and not link.linking and link.core is not None and link.core.enabled
                and link.server is None and not link.keep and not link.skip):
            self._auto_link_read(link)
            return 0
        return self._read_slow(link)

    cdef int _login_read(self, Link link) except -1:
        """A client whose login the engine reads (Link.engine_login, set when it was accepted): the
        StartupMessage, SSL/GSS requests answered N, the md5 answer checked in C. Python is called
        once the startup packet is whole (engine_startup: the checks, the auth plan; it returns
        what an md5 check needs, or goes on itself) and once the answer is checked
        (engine_password_checked). Anything else (TLS, a cancel request, a packet Python's reader
        would refuse, bytes beyond what the step waits for) goes to Python's login as bytes
        (engine_login_escape), which takes over from there."""
        cdef unsigned char *b
        cdef Py_ssize_t keep = link.rkeep, end, pos = 0, avail, length, limit
        cdef ssize_t r
        cdef unsigned int code
        cdef unsigned char msg[13]
        cdef int ok
        cdef bint escape = False
        if keep:
            grow(&link.rbuf, &link.rcap, keep + MIN_KEEP)
            b = link.rbuf
            r = self._recv(link, b + keep, link.rcap - keep)
        else:
            b = self.shared
            r = self._recv(link, b, SHARED_SIZE)
        if r < 0:
            return 0
        end = keep + r
        limit = link.max_packet_size if link.max_packet_size < MAX_STARTUP_PACKET else MAX_STARTUP_PACKET
        while link.engine_login and link.fd >= 0 and not link.closing:
            avail = end - pos
            if link.engine_login == CL_STARTUP:
                if avail < 8:
                    break
                length = be32(b + pos)
                code = be32(b + pos + 4)
                if length < 8 or length > limit or avail > length:
                    escape = True  # (bytes beyond the packet: Python's reader decides what they are)
                    break
                if avail < length:
                    break
                if code == SSL_REQUEST_CODE or code == GSSENC_REQUEST_CODE:
                    if length != 8 or (code == SSL_REQUEST_CODE and self.offer_tls):
                        escape = True
                        break
                    link.send_bytes(<const unsigned char *>b"N", 1)
                    pos += 8
                    continue
                if (code >> 16) != 3:
                    escape = True
                    break
                key = route = None
                if code == PROTOCOL_3_0:  # (another minor version is negotiated: never a route)
                    key = PyBytes_FromStringAndSize(<char *>b + pos + 8, length - 8)
                    route = self.login_routes.get(key)
                if route is not None:
                    link._keep_bytes(b, 0)
                    self.route_logins += 1
                    secret = link.engine_route_startup(route)
                else:
                    params = startup_params(b + pos + 8, length - 8)
                    if params is None:
                        escape = True
                        break
                    link._keep_bytes(b, 0)
                    secret = link.engine_startup(code, params, key)
                if secret is None:  # Python goes on with this login (or ended it)
                    link._c_login_over()
                    return 0
                if type(secret) is tuple:  # a SCRAM exchange against a stored secret (auth/scram.py engine_offer)
                    link.login_secret = ScramLogin(*secret)
                    link.engine_login = CL_SASL_FIRST
                    link.send_bytes(<const unsigned char *>PyBytes_AS_STRING(AUTH_SASL_SCRAM),
                                    PyBytes_GET_SIZE(AUTH_SASL_SCRAM))
                    return 0
                if type(secret) is not bytes or PyBytes_GET_SIZE(secret) != MD5_INNER_LEN + 4:
                    raise TypeError("engine_startup: md5 digits and salt, or a SCRAM offer expected")
                link.login_secret = <bytes>secret
                msg[0] = 82  # 'R' AuthenticationMD5Password
                write_be32(msg + 1, 12)
                write_be32(msg + 5, 5)
                memcpy(msg + 9, PyBytes_AS_STRING(secret) + MD5_INNER_LEN, 4)
                link.engine_login = CL_MD5
                link.send_bytes(msg, 13)
                return 0
            else:  # CL_MD5, CL_SASL_FIRST, CL_SASL_FINAL: a 'p' message answers
                if avail < 5:
                    break
                length = be32(b + pos + 1)
                if b[pos] != 112 or length < 4 or length + 1 > MAX_AUTH_MESSAGE or avail > length + 1:
                    escape = True
                    break
                if avail < length + 1:
                    break
                if link.engine_login != CL_MD5:
                    if self._scram_step(link, b + pos + 5, length - 4):
                        escape = True
                        break
                    if link.engine_login == CL_SASL_FINAL:
                        link._keep_bytes(b, 0)  # (the whole read was the message)
                    return 0
                ok = md5_password_ok(<const unsigned char *>PyBytes_AS_STRING(link.login_secret),
                                     <const unsigned char *>PyBytes_AS_STRING(link.login_secret) + MD5_INNER_LEN,
                                     b + pos + 5, length - 4)
                if ok < 0:
                    escape = True
                    break
                link._c_login_over()
                self.c_logins += 1
                link.engine_password_checked(ok == 1)
                return 0
        if escape:
            data = PyBytes_FromStringAndSize(<char *>b + pos, end - pos)
            exchange = link.login_secret if link.engine_login >= CL_SASL_FIRST else None
            link._c_login_over()
            self.login_escapes += 1
            link.engine_login_escape(data, exchange)
            return 0
        if link.fd >= 0:
            link._keep_bytes(b + pos, end - pos)
        return 0

    cdef int _scram_step(self, Link link, const unsigned char *body, Py_ssize_t n) except -1:
        """The SASLInitialResponse or SASLResponse body[0:n] of a SCRAM exchange the engine runs
        (_login.pyx): answered here (0), or 1 when it is not in the plain form (Python's exchange
        takes over: engine_login_escape with the exchange so far). The end of the exchange goes
        to Python once: engine_password_checked(ok, SASLFinal message, ClientKey)."""
        cdef ScramLogin scram = <ScramLogin>link.login_secret
        cdef unsigned char nonce_raw[SCRAM_NONCE_RAW]
        cdef unsigned char client_key[SCRAM_KEY_LEN]
        cdef unsigned char signature[SCRAM_KEY_LEN]
        cdef unsigned char final[2 + 44]
        cdef int ok
        if link.engine_login == CL_SASL_FIRST:
            if getrandom(nonce_raw, SCRAM_NONCE_RAW, 0) != SCRAM_NONCE_RAW:
                return 1
            first = scram_first(scram, body, n, nonce_raw)
            if first is None:
                return 1
            answer = auth_request(AUTH_SASL_CONTINUE, <const unsigned char *>PyBytes_AS_STRING(first),
                                  PyBytes_GET_SIZE(first))
            link.engine_login = CL_SASL_FINAL
            link.send_bytes(<const unsigned char *>PyBytes_AS_STRING(answer), PyBytes_GET_SIZE(answer))
            return 0
        ok = scram_final(scram, body, n, client_key, signature)
        if ok < 0:
            return 1
        link._c_login_over()
        self.c_scram_logins += 1
        if not ok:
            link.engine_password_checked(False)
            return 0
        final[0] = 118  # "v=" and the ServerSignature in base64
        final[1] = 61
        b64_encode(signature, SCRAM_KEY_LEN, final + 2)
        link.engine_password_checked(True, auth_request(AUTH_SASL_FINAL, final, 2 + 44),
                                     PyBytes_FromStringAndSize(<const char *>client_key, SCRAM_KEY_LEN))
        return 0

    cdef ssize_t _recv(self, Link link, unsigned char *buf, Py_ssize_t cap) except -2:
        """One read for every path: > 0 bytes in buf (plaintext on a TLS link), -1 nothing to do
        now. End of stream and errors close the link (and return -1)."""
        cdef ssize_t r
        if link.tls is not None:
            return self._recv_tls(link, buf, cap)
        r = self._recv_raw(link, buf, cap)
        return r if r > 0 else -1

    cdef ssize_t _recv_raw(self, Link link, unsigned char *buf, Py_ssize_t cap) except -2:
        """recv() on the link's socket: > 0 bytes; -1 none now (EAGAIN); 0 the peer closed or the
        socket failed, and the link is closed."""
        cdef ssize_t r
        while True:
            r = recv(link.fd, buf, cap, 0)
            if r < 0 and errno == EINTR:
                continue
            break
        if r > 0:
            return r
        if r < 0 and errno == EAGAIN:
            return -1
        self._close_link(link, None if r == 0 else ConnectionResetError(errno, os.strerror(errno)))
        return 0

    cdef ssize_t _recv_tls(self, Link link, unsigned char *buf, Py_ssize_t cap) except -2:
        """TLS (ssl.SSLObject over MemoryBIOs, as uvloop does): raw bytes from the socket into
        `incoming`, plaintext out; during the handshake, the handshake's next step."""
        cdef TlsState st = <TlsState>link.tls
        cdef ssize_t r, got = 0
        if st.nat.ssl != NULL:
            return self._native_read(link, st, buf, cap)
        if st.live and st.sslobj.pending():
            got = self._tls_read(link, buf, cap)
        if got == 0:
            r = self._recv_raw(link, self.shared if st.live else buf, cap if cap < SHARED_SIZE else SHARED_SIZE)
            if r < 0:
                return -1
            if r == 0:
                self._tls_failed(link, "connection closed during the TLS handshake")
                return -1
            st.incoming.write(PyMemoryView_FromMemory(<char *>(self.shared if st.live else buf), r, PyBUF_READ))
            if not st.live:
                self._tls_step(link)
                if not st.live:
                    return -1
                if st.nat.ssl != NULL:  # records that came with the handshake's last ones: read in C
                    return self._native_read(link, st, buf, cap)
            got = self._tls_read(link, buf, cap)
            if got < 0:
                return -1
        if st.sslobj.pending() or st.incoming.pending:
            self.loop.call_soon(self._kick, link, link.gen)  # plaintext left: level-triggered epoll will not say
        return got if got > 0 else -1

    cdef ssize_t _tls_read(self, Link link, unsigned char *buf, Py_ssize_t cap) except -2:
        cdef TlsState st = <TlsState>link.tls
        cdef ssize_t got = 0, n
        while got < cap:
            try:
                n = st.sslobj.read(cap - got, PyMemoryView_FromMemory(<char *>buf + got, cap - got, PyBUF_WRITE))
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify: the end of the stream
                if got == 0:
                    self._close_link(link, None)
                    return -1
                break
            except ssl.SSLError as exc:
                self._close_link(link, ConnectionResetError(f"TLS error: {exc}"))
                return -1
            if n <= 0:  # (how SSLObject.read says close_notify once it was received)
                if got == 0:
                    self._close_link(link, None)
                    return -1
                break
            got += n
        return got

    cdef ssize_t _native_read(self, Link link, TlsState st, unsigned char *buf, Py_ssize_t cap) except -2:
        """A TLS link in C: plaintext OpenSSL already has, else the socket's records through it;
        > 0 bytes in buf, -1 nothing now (or the link closed: end of stream, TLS error)."""
        cdef ssize_t r, got = tls_read(&st.nat, buf, cap)
        if got == TLS_WANT:
            r = self._recv_raw(link, self.shared, cap if cap < SHARED_SIZE else SHARED_SIZE)
            if r <= 0:
                return -1
            tls_feed(&st.nat, self.shared, r)
            got = tls_read(&st.nat, buf, cap)
        if got == TLS_EOF:  # close_notify: the end of the stream
            self._close_link(link, None)
            return -1
        if got == TLS_ERROR:
            self._close_link(link, ConnectionResetError(f"TLS error: {tls_error_text()}"))
            return -1
        self._native_flush(link, st)  # what the read made OpenSSL answer (none, mostly)
        if got == TLS_WANT:
            return -1
        if tls_pending(&st.nat):
            self.loop.call_soon(self._kick, link, link.gen)  # plaintext left: level-triggered epoll will not say
        return got

    cdef int _native_flush(self, Link link, TlsState st) except -1:
        """Send the records OpenSSL left in the outgoing BIO."""
        cdef Py_ssize_t n
        while True:
            n = tls_take_output(&st.nat, self.tlsout, SHARED_SIZE)
            if n <= 0:
                return 0
            link._send_raw(self.tlsout, n)

    def _kick(self, Link link, unsigned int gen):
        """Plaintext a TLS link already decrypted (no epoll event will come for it)."""
        if link.fd < 0 or link.gen != gen or link.held or link.reading_paused or link.closing:
            return
        self.in_run = True
        try:
            self._on_readable(link)
        except Exception as exc:
            self.loop.call_exception_handler({"message": "pgmux engine: error in a link hook",
                                              "exception": exc, "protocol": link})
            self._close_link(link, exc)
        finally:
            self.in_run = False
            self._pause_writers()

    # ------------------------------------------------------------ TLS handshake (server side of it)

    def start_tls(self, Link link, ctx, bint server_side=True, server_hostname=None):
        """Switch an adopted link to TLS; the returned future completes with the handshake (an
        OSError when it fails: the link is closed then)."""
        cdef TlsState st = TlsState()
        st.incoming = ssl.MemoryBIO()
        st.outgoing = ssl.MemoryBIO()
        st.sslobj = ctx.wrap_bio(st.incoming, st.outgoing, server_side=server_side, server_hostname=server_hostname)
        st.waiter = self.loop.create_future()
        link.tls = st
        if not server_side:
            self._tls_step(link)  # the client speaks first: ClientHello
        return st.waiter

    cdef int _tls_step(self, Link link) except -1:
        cdef TlsState st = <TlsState>link.tls
        try:
            st.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLError, OSError) as exc:
            self._tls_flush(link)
            self._close_link(link, ConnectionResetError(str(exc)))
            self._tls_failed(link, str(exc))
            return 0
        else:
            st.live = True
            if self.native_tls and tls_native_from(st.sslobj, st.incoming, st.outgoing, &st.nat):
                self.tls_native += 1
            else:
                self.tls_python += 1
        self._tls_flush(link)
        if st.live and not st.waiter.done():
            st.waiter.set_result(None)
        return 0

    cdef int _tls_flush(self, Link link) except -1:
        cdef TlsState st = <TlsState>link.tls
        data = st.outgoing.read()
        if data:
            link._send_raw(<const unsigned char *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        return 0

    cdef int _tls_failed(self, Link link, str why) except -1:
        cdef TlsState st = <TlsState>link.tls
        if st is not None and st.waiter is not None and not st.waiter.done():
            st.waiter.set_exception(ConnectionResetError(why))
        return 0

    cdef int _read_slow(self, Link link) except -1:
        """The generic path: asyncio.BufferedProtocol's get_buffer / buffer_updated."""
        cdef Py_buffer view
        cdef ssize_t r
        buf = link.get_buffer(-1)
        PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
        try:
            r = self._recv(link, <unsigned char *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        if r > 0:
            link.buffer_updated(r)
        return 0

    cdef int _read_fast(self, Link link) except -1:
        cdef unsigned char *base
        cdef unsigned char *nb
        cdef Py_ssize_t room, keep = link.rkeep, cap
        cdef ssize_t r
        if keep:
            grow(&link.rbuf, &link.rcap, keep + MIN_KEEP)
            base = link.rbuf
            room = link.rcap - keep
            if room > SHARED_SIZE:
                room = SHARED_SIZE
        else:
            base = self.tlsplain if link.tls is not None else self.shared
            room = SHARED_SIZE
        r = self._recv(link, base + keep, room)
        if r < 0:
            return 0
        self.fast_reads += 1
        if link.kind == KIND_CLIENT:
            link.request_time = self.now
            return self._client_walk(link, link.peer, base, keep + r)
        return self._server_walk(link, link.peer, base, keep, keep + r)

    # ------------------------------------------------------------ client -> server

    cdef int _client_walk(self, Link c, Link s, unsigned char *b, Py_ssize_t end) except -1:
        """Forward b[0:end] (bytes kept from earlier reads first) to the linked server, message by
        message; stop at a message Python must decide (escape) or an incomplete one (keep).
        Tracked links (CF_TRACKED: the client has named statements) also record each request in
        the server's ring and give Bind/Describe of a statement prepared on this server its
        server-side name; everything that needs ResponseTracker's specials escapes."""
        cdef Py_ssize_t pos = 0, stop, nxt, tl, nl, run = 0
        cdef unsigned int ln
        cdef unsigned char typ, flags = c.flags
        cdef bint escape = False, tracked = (flags & CF_TRACKED) != 0, rewritten = False
        cdef bint lazy = not tracked and (flags & CF_LAZY_PREPARE) != 0
        cdef const unsigned char *body
        cdef long long skip = c.rskip
        cdef object stmts = None, lru = None
        cdef QueryStats qs = self.qstats
        cdef int qpool = s.core.qpool if qs.enabled and s.core is not None else -1
        cdef long long qh, h = NO_SHAPE
        cdef unsigned char verdict = 0
        cdef unsigned char *verdict_at = NULL
        if skip:
            if skip >= end:
                c.rskip = skip - end
                s.send_bytes(b, end)
                if s.link_stats is not None:
                    s.link_stats.bytes_received += end
                c._keep_bytes(b, 0)
                return 0
            pos = <Py_ssize_t>skip
            c.rskip = 0
        if tracked:
            stmts = c.stmts
            lru = s.stmts.lru
            self.scratch_len = 0
        while True:
            if end - pos < 5:
                stop = pos
                break
            typ = b[pos]
            ln = be32(b + pos + 1)
            if ln < 4 or ln > c.max_packet_size:
                escape = True  # Python refuses it with PgBouncer's error
                stop = pos
                break
            nxt = pos + 1 + <Py_ssize_t>ln
            body = b + pos + 5
            if typ == 81 or typ == 80 or typ == 67 or typ == 88 or ((tracked or lazy) and (typ == 66 or typ == 68)):
                if nxt > end:  # decided on the whole message
                    stop = pos
                    break
            if typ == 66 and qpool >= 0:  # the statement it runs (its name, when whole here)
                s.q_statement(c.bind_query(body, <Py_ssize_t>ln - 4 if nxt <= end else end - pos - 5))
            if typ == 66 or typ == 68:  # Bind, Describe: busy until Sync
                if tracked:
                    tl = self._statement_ref(c, s, b, pos, ln, typ, stmts, lru, run)
                    if tl < 0:
                        escape = True
                        stop = pos
                        break
                    if tl > 0:
                        run = nxt
                        rewritten = True
                    s.ring_push(typ)
                elif lazy and names_statement(body, <Py_ssize_t>ln - 4, typ):
                    escape = True  # a statement this client never prepared through pgmux: Python
                    stop = pos
                    break
                s.pending_ext = True
            elif typ == 69:  # Execute
                if s.q != NULL:
                    s.q.pending = s.q.statement
                if tracked:
                    s.ring_push(69)
                s.pending_ext = True
            elif typ == 81:  # Query
                tl = <Py_ssize_t>ln - 5  # the text, without its NUL
                if tl < 0:
                    tl = 0
                if qpool >= 0:  # the shape's verdict, or the tests run now (and kept with it)
                    h = self._shape_find(c, qpool, body, tl, &verdict_at)
                    if verdict_at == NULL or not (verdict_at[0] & V_KNOWN):
                        verdict = query_verdict(body, tl)
                        if verdict_at != NULL:
                            verdict_at[0] = verdict
                    else:
                        verdict = verdict_at[0]
                    escape = (verdict & V_DATABASE) or ((flags & CF_PIN_HINTS) and (verdict & V_STATE))
                else:
                    escape = names_database(body, tl) or ((flags & CF_PIN_HINTS) and maybe_session_state(body, tl))
                if escape or (tracked and tl and may_deallocate(body[0])):
                    escape = True
                    stop = pos
                    break
                if qpool >= 0:
                    s.q_pending(h if h != NO_SHAPE else self._statement_handle(c, qpool, body, tl, verdict))
                s.note_request(81, self.now)
                if tracked:
                    s.ring_push(81)
            elif typ == 83:  # Sync
                s.note_request(83, self.now)
                s.pending_ext = False
                if tracked:
                    s.ring_push(83)
            elif typ == 70:  # FunctionCall
                s.q_pending(-1)
                s.note_request(70, self.now)
                if tracked:
                    s.ring_push(70)
            elif typ == 80:  # Parse
                tl = cstr_len(body, <Py_ssize_t>ln - 4)  # the statement name
                if tl < 0:
                    escape = True  # malformed: Python decides
                elif tl > 0 and (flags & (CF_LAZY_PREPARE | CF_PIN_HINTS | CF_TRACKED) or reserved_name(body, tl)):
                    escape = True  # a named Parse: tracking or pinning starts, or a reserved name
                elif flags & (CF_PIN_HINTS | CF_TRACKED) or qpool >= 0:
                    nl = cstr_len(body + tl + 1, <Py_ssize_t>ln - 5 - tl)
                    if nl < 0:
                        escape = (flags & (CF_PIN_HINTS | CF_TRACKED)) != 0
                    elif (flags & CF_PIN_HINTS) and maybe_session_state(body + tl + 1, nl):
                        escape = True
                    elif tracked and nl and may_deallocate(body[tl + 1]):
                        escape = True  # SQL DEALLOCATE in an unnamed Parse: Python rewrites it
                    elif qpool >= 0:
                        c.parse_noted(s, qpool, body, tl, body + tl + 1, nl)
                if escape:
                    stop = pos
                    break
                if tracked:
                    s.ring_push(80)
                s.pending_ext = True
            elif typ == 67:  # Close
                if ln >= 5 and body[0] == 83 and (reserved_name(body + 1, <Py_ssize_t>ln - 5)
                                                  or (tracked and ln > 5 and body[1] != 0)):
                    escape = True  # a Close of a named statement: answered by pgmux (tracked)
                    stop = pos
                    break
                if tracked:
                    s.ring_push(67)
                s.pending_ext = True
            elif typ == 99 or typ == 102:  # CopyDone, CopyFail
                if tracked and s.copy_in > 0:
                    s.ring_drop_syncs()
                s.copy_end()
            elif typ == 100 or typ == 72:  # CopyData, Flush
                pass
            else:  # Terminate, or a type no client may send
                escape = True
                stop = pos
                break
            if nxt >= end:
                c.rskip = nxt - end
                stop = end
                break
            pos = nxt
        if rewritten:
            self._scratch_add(b + run, stop - run)
            s.send_bytes(self.scratch, self.scratch_len)
            if s.link_stats is not None:
                s.link_stats.bytes_received += self.scratch_len
            self.scratch_len = 0
        elif stop:
            s.send_bytes(b, stop)
            if s.link_stats is not None:
                s.link_stats.bytes_received += stop
        if escape:
            data = PyBytes_FromStringAndSize(<char *>b + stop, end - stop)
            c._keep_bytes(b, 0)
            c.rskip = 0
            self.escapes += 1
            self._to_slow(c)
            self._to_slow(s)
            c.engine_escape(data)
            return 0
        c._keep_bytes(b + stop, end - stop)
        return 0

    cdef Py_ssize_t _statement_ref(self, Link c, Link s, unsigned char *b, Py_ssize_t pos, unsigned int ln,
                                   unsigned char typ, object stmts, object lru, Py_ssize_t run) except -2:
        """A Bind or Describe on a tracked link, whole in b[pos:pos+1+ln]. 0: it names no statement
        (forward as is); 1: it names one of the client's statements prepared on this server, and
        the message with the server-side name went to the scratch output (after b[run:pos]);
        -1: Python decides (unknown name, not prepared here, malformed)."""
        cdef const unsigned char *body = b + pos + 5
        cdef Py_ssize_t blen = <Py_ssize_t>ln - 4, name_pos, name_len, sl
        cdef const unsigned char *sname
        cdef unsigned char hdr[5]
        cdef Statement stmt
        if typ == 66:  # Bind: portal name, then statement name
            name_pos = cstr_len(body, blen)
            if name_pos < 0:
                return -1
            name_pos += 1
        else:  # Describe: 'S' statement or 'P' portal
            if blen < 1:
                return -1
            if body[0] != 83:
                return 0
            name_pos = 1
        name_len = cstr_len(body + name_pos, blen - name_pos)
        if name_len < 0:
            return -1
        if name_len == 0:
            return 0
        found = stmts.get(c.statement_name(body + name_pos, name_len))
        if found is None:
            return -1
        stmt = <Statement>found
        if stmt.id not in lru:
            return -1  # not prepared on this server: Python prepares it first
        if stmt.id != s.lru_last_id or PyDict_GET_SIZE(lru) != s.lru_last_size:
            # (skipped when it was the last one moved here and the LRU's size did not change since:
            # it is the newest still, unless Python's path moved another one, which only makes the
            # eviction order a little off; whether it is prepared is always checked above)
            _move_to_end(lru, stmt.id)
            s.lru_last_id = stmt.id
            s.lru_last_size = <int>PyDict_GET_SIZE(lru)
        sname = <const unsigned char *>PyBytes_AS_STRING(stmt.server_name)
        sl = PyBytes_GET_SIZE(stmt.server_name)
        if typ == 66 and s.link_stats is not None:
            s.link_stats.bind_count += 1
        self._scratch_add(b + run, pos - run)
        hdr[0] = typ
        write_be32(hdr + 1, <unsigned int>(4 + blen - name_len + sl))
        self._scratch_add(hdr, 5)
        self._scratch_add(body, name_pos)
        self._scratch_add(sname, sl)
        self._scratch_add(body + name_pos + name_len, blen - name_pos - name_len)
        return 1

    cdef long long _shape_find(self, Link c, int pool, const unsigned char *q, Py_ssize_t n,
                               unsigned char **verdict) noexcept:
        """The QueryStats handle of a statement text from client c when it has the same shape
        (same_shape) as c's last statement or as one in its set of the engine's shape table
        (statements that alternate, as TPC-B's seven, and those every client of a pool sends),
        with `verdict` pointing at that entry's Verdict bits; else NO_SHAPE (verdict NULL).
        c may be None (a server's Python path that lost its client)."""
        cdef QLast *last = c.qlast if c is not None else NULL
        cdef Shape *set_
        cdef Shape *sh
        cdef int k
        verdict[0] = NULL
        if (last != NULL and last.pool == pool and same_shape(last.text, last.len, q, n)
                and self.qstats.touch(last.handle)):
            verdict[0] = &last.verdict
            return last.handle
        if n <= SHAPE_TEXT_MAX and self.shapes != NULL:
            set_ = &self.shapes[shape_slot(q, n, pool)]
            for k in range(SHAPE_WAYS):
                sh = &set_[k]
                if (sh.len > 0 and sh.pool == pool and same_shape(sh.text, sh.len, q, n)
                        and self.qstats.touch(sh.handle)):
                    if last == NULL:  # a client's first statement: its last from now on (-S repeats it)
                        self._remember_last(c, q, n, pool, sh.handle, sh.verdict)
                    verdict[0] = &sh.verdict  # (the shared entry: what the caller learns serves every client)
                    return sh.handle
        return NO_SHAPE

    cdef long long _statement_handle(self, Link c, int pool, const unsigned char *q, Py_ssize_t n,
                                     unsigned char verdict=0) noexcept:
        """The QueryStats handle of a statement text from client c: a known shape's (_shape_find),
        else a lookup, which normalizes it; the text is then kept as c's last and in the shape
        table, with `verdict` (the Verdict bits the caller worked out, 0: none)."""
        cdef unsigned char *unused
        cdef Shape *set_ = NULL
        cdef long long h
        if verdict == 0:  # (with a verdict, the caller has just looked: a miss)
            h = self._shape_find(c, pool, q, n, &unused)
            if h != NO_SHAPE:
                return h
        if n <= SHAPE_TEXT_MAX:
            if self.shapes == NULL:
                self.shapes = <Shape *>calloc(SHAPE_SLOTS, sizeof(Shape))
            if self.shapes != NULL:
                set_ = &self.shapes[shape_slot(q, n, pool)]
        h = self.qstats.lookup(pool, q, n)
        if h < 0:
            return h
        if set_ != NULL:
            self._shape_store(set_, q, n, pool, h, verdict)
        self._remember_last(c, q, n, pool, h, verdict)
        return h

    cdef void _remember_last(self, Link c, const unsigned char *q, Py_ssize_t n, int pool, long long h,
                             unsigned char verdict) noexcept:
        cdef QLast *last
        if c is None or n > QTEXT_KEEP:
            return
        last = c.qlast
        if last == NULL:
            last = c.qlast = <QLast *>malloc(sizeof(QLast))
            if last == NULL:
                return
        remember_shape(last, q, n, pool, h, verdict)

    cdef void _shape_store(self, Shape *set_, const unsigned char *q, Py_ssize_t n, int pool, long long h,
                           unsigned char verdict) noexcept:
        """A new text in its set: in a free way, else in the ways' turn."""
        cdef Shape *sh = NULL
        cdef unsigned char *nt
        cdef int k
        for k in range(SHAPE_WAYS):
            if set_[k].len == 0:
                sh = &set_[k]
                break
        if sh == NULL:
            self.shape_turn += 1
            sh = &set_[self.shape_turn & (SHAPE_WAYS - 1)]
        if sh.cap < n:
            nt = <unsigned char *>realloc(sh.text, n)
            if nt == NULL:
                return
            sh.text = nt
            sh.cap = <int>n
        memcpy(sh.text, q, n)
        sh.len = <int>n if n > 0 else 0
        sh.pool = pool
        sh.handle = h
        sh.verdict = verdict

    cdef int _scratch_add(self, const unsigned char *p, Py_ssize_t n) except -1:
        cdef Py_ssize_t cap
        cdef unsigned char *nb
        if n <= 0:
            return 0
        grow(&self.scratch, &self.scratch_cap, self.scratch_len + n)
        memcpy(self.scratch + self.scratch_len, p, n)
        self.scratch_len += n
        return 0

    # ------------------------------------------------------------ server -> client

    cdef int _server_walk(self, Link s, Link c, unsigned char *b, Py_ssize_t keep, Py_ssize_t end) except -1:
        """Cut-through: forward the new bytes b[keep:end] first, then walk their headers."""
        cdef Py_ssize_t pos = 0, stop, nxt, n = end - keep
        cdef unsigned int ln
        cdef unsigned char typ
        cdef bint ready = False, escape = False, tracked = s.tracked_fast
        cdef int front
        cdef long long skip = s.rskip
        cdef list hooks = None
        c.send_bytes(b + keep, n)
        if s.link_stats is not None:
            s.link_stats.bytes_sent += n
        if skip and not keep:
            if skip >= n:
                s.rskip = skip - n
                s._keep_bytes(b, 0)
                if s.boundary_due:
                    self._end_of_transaction(s)
                return 0
            pos = <Py_ssize_t>skip
            s.rskip = 0
        while True:
            if end - pos < 5:
                stop = pos
                break
            typ = b[pos]
            ln = be32(b + pos + 1)
            if ln < 4:
                s._keep_bytes(b, 0)
                self._close_link(s, ConnectionError("bad packet header from server"))
                return 0
            nxt = pos + 1 + <Py_ssize_t>ln
            if tracked:
                if typ == 69:  # ErrorResponse: ResponseTracker's error rules are Python's
                    if nxt > end:
                        stop = pos
                        break
                    escape = True
                    stop = pos
                    break
                front = s.ring_front()
                if typ == 90:
                    if front == 83 or front == 81 or front == 70:
                        s.ring_pop()
                elif typ == 49 or typ == 50 or typ == 51:  # ParseComplete, BindComplete, CloseComplete
                    if front == 80 or front == 66 or front == 67:
                        s.ring_pop()
                elif typ == 84 or typ == 110:  # RowDescription, NoData
                    if front == 68:
                        s.ring_pop()
                elif typ == 67 or typ == 73 or typ == 115:  # CommandComplete, EmptyQuery, PortalSuspended
                    if front == 69:
                        s.ring_pop()
            if typ == 90 or typ == 83 or typ == 67:  # Z S C: read whole
                if nxt > end:
                    stop = pos
                    break
                if typ == 90:
                    if ln >= 5:
                        s.ready_for_query(b[pos + 5], self.now)
                    ready = True
                elif typ == 83:
                    if hooks is None:
                        hooks = []
                    hooks.append((s.engine_parameter_status, PyBytes_FromStringAndSize(<char *>b + pos + 5, ln - 4)))
                elif ln >= 5:  # CommandComplete
                    if s.q != NULL:  # rows, for per-query statistics
                        s.q.rows += tag_rows(b + pos + 5, <Py_ssize_t>ln - 4)
                    if b[pos + 5] == 68 and ((ln - 4 >= 11 and memcmp(b + pos + 5, b"DISCARD ALL", 11) == 0)
                                             or (ln - 4 >= 10 and memcmp(b + pos + 5, b"DEALLOCATE", 10) == 0)):
                        if tracked:  # forgets prepared statements: ResponseTracker's business
                            escape = True
                            stop = pos
                            break
                        if hooks is None:
                            hooks = []
                        hooks.append((s.engine_command_complete,
                                      PyBytes_FromStringAndSize(<char *>b + pos + 5, ln - 4)))
            elif typ == 69:  # ErrorResponse (untracked: tracked ones escaped above)
                if s.q != NULL:
                    s.q.error = True
            elif typ == 71:  # CopyInResponse
                if tracked and s.copy_in >= 0:
                    s.ring_drop_syncs()
                s.copy_started()
            if nxt >= end:
                s.rskip = nxt - end
                stop = end
                break
            pos = nxt
        if escape:  # b[stop:end] went to the client already (cut-through): Python accounts for it
            data = PyBytes_FromStringAndSize(<char *>b + stop, end - stop)
            s._keep_bytes(b, 0)
            s.rskip = 0
            self.escapes += 1
            self._to_slow(s)
            self._to_slow(c)
            if hooks is not None:
                for hook, arg in hooks:
                    hook(arg)
            s.engine_escape_server(data)
            return 0
        s._keep_bytes(b + stop, end - stop)
        if hooks is not None:
            # Python runs only now, with the walk's state saved: a hook may unlink, close or
            # raise (run() then closes the link) without the walk reading freed or stale bytes.
            for hook, arg in hooks:
                hook(arg)
            if s.mode != MODE_FAST or s.peer is not c:
                return 0
        if ready or s.boundary_due:
            self._end_of_transaction(s)
        return 0

    cdef int _end_of_transaction(self, Link s) except -1:
        """After a ReadyForQuery: with nothing outstanding the link ends, but only on a message
        boundary (a notice cut by the read belongs to this client: `boundary_due`)."""
        cdef Link c = s.peer
        if s.outstanding or s.pending_ext or s.ring_len:
            s.boundary_due = False  # the client asked again: its next ReadyForQuery decides
            return 0
        s.copy_in = 0  # a COPY that failed ends without the client's CopyDone
        if s.rkeep or s.rskip:
            s.boundary_due = True
            return 0
        s.boundary_due = False
        if c is None or (c.flags & CF_SESSION) or c.rskip:
            return 0
        if s.status != 73 and not c.linking and not s.statement_mode:
            return 0  # in a transaction block (T, E), transaction mode: the server stays, nothing to decide
        if not self._release(s, c):
            s.engine_transaction_end()
        return 0

    # ------------------------------------------------------------ link and release (objects.c)

    cdef bint _release(self, Link s, Link c) except -1:
        """Transaction mode, ReadyForQuery 'I' with nothing outstanding: give the server to the
        next waiting client, or back to the idle list, as Pooler.transaction_boundary and
        server_ready do, when nothing about the client or server needs Python to decide.
        False: Python decides (engine_transaction_end)."""
        cdef PoolCore core = s.core
        cdef Link w
        if not c.auto or core is None or not core.enabled:
            return False
        if (s.status != 73 or c.rkeep or c.closed or s.closed or s.close_needed or s.cancels or s.dirty
                or c.linking or c.waiting):
            return False
        if core.paused:
            return False
        if core.lifetime > 0 and self.now - s.connect_time >= core.lifetime:
            return False
        self._to_slow(c)
        self._to_slow(s)
        s.forwarding = False  # (stop_forwarding: nothing is carried) bytes of an idle server go to its inbox
        c.server = None
        s.client = None
        while core.waiting:
            w = core.waiting_popleft()
            if w.closed:
                continue
            if self._can_link(w, s):
                w.waiting = False
                self._link(w, s)
                return True
            core.waiting_appendleft(w)
            s.engine_server_ready()  # a waiter the engine cannot link: Python does
            return True
        s.state = S_IDLE
        core.active_discard(s)
        core.idle_append(s)
        return True

    cdef bint _can_link(self, Link c, Link s) except -1:
        """The engine may link this client and server by itself: same tracked parameters, no
        check query due, nothing about either that needs a slow-path step."""
        cdef PoolCore core = s.core
        if (not c.auto or c.closed or c.linking or c.fd < 0 or c.write_paused or c.read_paused
                or s.fd < 0 or s.closed or s.close_needed or s.cancels or s.dirty or s.rkeep or s.rskip):
            return False
        if core is None or (core.check_delay >= 0 and self.now - s.last_used >= core.check_delay):
            return False
        ck = c.params._tracked_key
        sk = s.params._tracked_key
        if ck is None or (ck is not sk and ck != sk):  # (keys are interned: mostly the same object)
            return False
        if s.inbox:
            return False
        if c.flags & CF_TRACKED:  # ResponseTracker must hold nothing the engine cannot account for
            tracker = s.tracker
            if tracker.queue or tracker.skipping or tracker.own_deallocs:
                return False
        return True

    cdef int _link(self, Link c, Link s) except -1:
        """Pooler.link + _start_link for a link _can_link accepted."""
        cdef PoolStats stats = s.core.stats
        cdef long long us
        cdef bint tracked
        cdef QLink *q
        c.server = s
        s.client = c
        s.state = S_ACTIVE
        stats.server_assignment_count += 1
        if c.wait_started:
            us = <long long>((self.now - c.wait_started) * 1000000)
            stats.wait_time_us += us
            if stats.histograms:
                observe(stats.wait_hist, us)
            c.wait_started = 0.0
            if self.qstats.enabled:
                q = s.qlink()
                if q != NULL:
                    q.wait_us = us
        tracked = (c.flags & CF_TRACKED) != 0
        c.tracking = tracked
        s.tracking = tracked
        s.statement_mode = False
        s.sent_prefix = 0
        s.forwarding = True
        return self._join(c, s)

    cdef int _join(self, Link c, Link s) except -1:
        """Both sides on the fast path; bytes the client sent meanwhile are walked now."""
        c.kind = KIND_CLIENT
        s.kind = KIND_SERVER
        s.tracked_fast = (c.flags & CF_TRACKED) != 0
        self._to_fast(s)
        self._to_fast(c)
        c.peer = s
        s.peer = c
        if c.rkeep:
            self._client_walk(c, s, c.rbuf, c.rkeep)
        return 0

    cdef bint _auto_link_read(self, Link c) except -1:
        """An unlinked client that the engine may link has something to read: read it; take an
        idle server and forward it natively when one can be linked, else hand the bytes to the
        Python protocol (which queues the client, answers a lone Parse, closes on Terminate)."""
        cdef PoolCore core = c.core
        cdef ssize_t r
        cdef Link s = None
        cdef unsigned char *b = self.tlsplain if c.tls is not None else self.shared
        cdef Py_ssize_t pe
        cdef bint take
        r = self._recv(c, b, SHARED_SIZE)
        if r < 0:
            return True
        c.request_time = self.now
        take = True
        if b[0] == 88:  # Terminate: no server needed
            if r == 5 and be32(b + 1) == 4:  # all it sent: it leaves (no trip through the slow path)
                c.close_requested()
                return True
            take = False
        elif b[0] == 80 and (c.flags & CF_LAZY_PREPARE) and r >= 15:  # a lone named Parse + Sync
            pe = 1 + <Py_ssize_t>be32(b + 1)
            if b[5] != 0 and pe + 5 == r and b[pe] == 83 and be32(b + pe + 1) == 4:
                take = False
        if take and (core.paused or core.login_failing or c.write_paused or c.read_paused):
            take = False
        elif take and (core.waiting or not core.idle):
            self._enqueue(c, b, r)
            return True
        if take:
            s = core.idle_popleft() if core.round_robin else core.idle_pop()
            if not self._can_link(c, s):
                if core.round_robin:
                    core.idle.appendleft(s)
                else:
                    core.idle_append(s)
                take = False
        if not take:
            self._deliver_slow(c, b, r)
            return True
        core.active_add(s)
        self._link(c, s)
        self.fast_reads += 1
        self._client_walk(c, s, b, r)
        return True

    cdef int _enqueue(self, Link c, unsigned char *b, Py_ssize_t n) except -1:
        """No idle server (or others wait first): queue the client as Pooler.request_server does,
        holding its bytes in C (what it sends meanwhile joins them, _read_held). New servers are
        asked for only when the pool may grow."""
        cdef PoolCore core = c.core
        pool = core.pool
        c._keep_bytes(b, n)
        c.held = True  # (still read: more bytes join these, and a client leaving is seen)
        c.waiting = True
        c.wait_started = self.now
        core.waiting.append(c)
        if core.reserve or len(core.idle) + len(core.active) + len(pool.busy) + pool.connecting < core.pool_size:
            c.engine_queued()
        return 0

    cdef int _read_held(self, Link c) except -1:
        """A queued client sent more: kept after what it sent before (walked once it is linked),
        up to HOLD_LIMIT; beyond that it is not read until linked. Its leaving is seen here too."""
        cdef ssize_t r
        cdef unsigned char *nb
        cdef Py_ssize_t cap
        grow(&c.rbuf, &c.rcap, c.rkeep + MIN_KEEP)
        r = self._recv(c, c.rbuf + c.rkeep, c.rcap - c.rkeep)
        if r > 0:
            c.rkeep += r
            if c.rkeep >= HOLD_LIMIT:
                c.held_full = True
                self._update_events(c)
        return 0

    cdef int _deliver_slow(self, Link link, unsigned char *p, Py_ssize_t n) except -1:
        """Bytes the engine read itself, given to the Python protocol as if it had read them."""
        cdef Py_buffer view
        cdef Py_ssize_t k
        while n > 0 and not link.closed:
            buf = link.get_buffer(n)
            PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
            try:
                k = view.len if view.len < n else n
                memcpy(view.buf, p, k)
            finally:
                PyBuffer_Release(&view)
            del buf
            link.buffer_updated(k)
            p += k
            n -= k
        return 0

    # ------------------------------------------------------------ mode changes

    cdef int _to_slow(self, Link link) except -1:
        """Hand what C carries for this link (kept bytes, body still to come) to the Python
        protocol's buffer, and read through it from now on."""
        cdef Py_ssize_t k = link.rkeep
        if link.mode == MODE_SLOW:
            return 0
        link.mode = MODE_SLOW
        link.peer = None
        if link.tracked_fast:
            link.tracked_fast = False
            if link.ring_len:
                link.engine_take_requests(link.ring_take())
        if k:
            carried_to_python(link, link.rbuf, k)
        link.keep = k
        link.skip = link.rskip
        if link.kind == KIND_SERVER:
            link.sent_prefix = k  # kept server bytes were forwarded already (the tracked path's view)
        link._keep_bytes(link.rbuf, 0)
        link.rskip = 0
        return 0

    cdef int _to_fast(self, Link link) except -1:
        """Take the Python protocol's carried bytes (keep, skip) into C."""
        cdef Py_ssize_t k = link.keep
        cdef const unsigned char[::1] view
        if link.mode == MODE_FAST:
            return 0
        if k:
            if link.rkeep:  # cannot happen: held bytes are reclaimed before Python adds any
                raise RuntimeError("engine: bytes held in C and in Python")
            data = bytes(link.buf[:k])
            view = data
            link._keep_bytes(&view[0], k)
            link.keep = 0
        if link.skip:
            link.rskip = link.skip
            link.skip = 0
        self._unhold(link)
        link.mode = MODE_FAST
        return 0

    cdef int _unhold(self, Link link) except -1:
        link.held = False
        if link.held_full:
            link.held_full = False
            self._update_events(link)
        return 0

    def link_fast(self, Link client, Link server, int flags):
        """Forward natively between a linked client and server from now on; bytes the client
        sent meanwhile are walked and forwarded now."""
        if client.fd < 0 or server.fd < 0 or client.eng is not self or server.eng is not self:
            return False
        client.flags = flags
        self.now = monotonic()
        self._join(client, server)
        return True

    def auto_link(self, Link client, int flags):
        """Let the engine link an unlinked client by itself at its next request (as after a
        transaction it released natively): a client just logged in."""
        if client.eng is not self or client.fd < 0 or client.peer is not None:
            return False
        client.flags = flags
        client.auto = True
        return True

    def unlink(self, Link link):
        """Back to the slow path, both sides of the link (no-op for a slow link)."""
        cdef Link peer = link.peer
        self._to_slow(link)
        if peer is not None:
            self._to_slow(peer)

    def stats(self):
        return {"batches": self.batches, "reads": self.reads, "fast_reads": self.fast_reads,
                "escapes": self.escapes, "tls_native": self.tls_native, "tls_python": self.tls_python,
                "c_logins": self.c_logins, "login_escapes": self.login_escapes, "route_logins": self.route_logins,
                "c_scram_logins": self.c_scram_logins,
                "loop_held": int(self.hold), "holds": self.holds, "hold_batches": self.hold_batches}


# Link.engine_login's first state, for Python (listener.EngineServer sets it on a client it may read in C).
C_LOGIN_STARTUP = CL_STARTUP

# Client flags for Engine.link_fast (the ClientFlag enum of _engine.pxd), for Python.
PIN_HINTS = CF_PIN_HINTS
LAZY_PREPARE = CF_LAZY_PREPARE
SESSION = CF_SESSION
TRACKED = CF_TRACKED
