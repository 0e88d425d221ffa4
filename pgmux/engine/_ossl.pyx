# cython: language_level=3, boundscheck=False, wraparound=False
"""OpenSSL called from C: a TLS link's records, MD5 for the engine's md5 login and SHA-256 / HMAC for its
SCRAM exchange (_login.pyx).

A TLS link's records: once an ssl.SSLObject's handshake is over, the engine reads and
writes its records by calling OpenSSL on that object's own SSL and BIOs, instead of a Python
call (and, for "no more data", a raised SSLWantReadError) per read and per write.

The handshake, certificates and everything SHOW or `get_extra_info` reads stay with Python's
ssl module, which keeps owning the objects (the engine holds the SSLObject as long as it uses
them). The OpenSSL functions are the ones Python's `_ssl` module is linked with, looked up in
that module's own scope (dlopen of `_ssl` with RTLD_NOLOAD, then dlsym): no OpenSSL headers or
library at build time, and never a second OpenSSL beside Python's. A link is handed to C only
after three checks that CPython's objects are laid out as read here (its SSLSocket's context
field is the context Python reports, the SSL's two BIOs are the MemoryBIOs' and its SSL_CTX the
context's); when any fails, or the functions are not found, the link keeps the Python path
(`ssl.SSLObject` calls), which stays as the fallback.

Lengths: every count handed to OpenSSL is checked against its type (BIO_write takes an int).
"""

from cpython.object cimport PyObject
from libc.limits cimport INT_MAX

import _ssl
import os

cdef extern from "<dlfcn.h>" nogil:
    void *dlopen(const char *filename, int flags)
    void *dlsym(void *handle, const char *symbol)
    int RTLD_NOW
    int RTLD_NOLOAD

# OpenSSL's stable ABI constants (ssl.h, bio.h; unchanged since 1.1.0)
cdef enum:
    SSL_ERROR_WANT_READ = 2
    SSL_ERROR_ZERO_RETURN = 6
    BIO_CTRL_PENDING = 10

ctypedef int (*ssl_rw_ex_t)(void *ssl, void *buf, size_t num, size_t *done) noexcept nogil
ctypedef int (*ssl_get_error_t)(const void *ssl, int ret) noexcept nogil
ctypedef int (*ssl_pending_t)(const void *ssl) noexcept nogil
ctypedef void *(*ssl_get_ptr_t)(const void *ssl) noexcept nogil
ctypedef int (*bio_rw_t)(void *bio, void *data, int dlen) noexcept nogil
ctypedef long (*bio_ctrl_t)(void *bio, int cmd, long larg, void *parg) noexcept nogil
ctypedef void (*err_clear_t)() noexcept nogil
ctypedef unsigned long (*err_get_t)() noexcept nogil
ctypedef void (*err_string_t)(unsigned long e, char *buf, size_t len) noexcept nogil
ctypedef unsigned char *(*md5_t)(const unsigned char *d, size_t n, unsigned char *md) noexcept nogil
ctypedef const void *(*evp_md_t)() noexcept nogil
ctypedef unsigned char *(*hmac_t)(const void *evp_md, const void *key, int key_len, const unsigned char *d,
                                  size_t n, unsigned char *md, unsigned int *md_len) noexcept nogil


cdef struct OpenSsl:
    ssl_rw_ex_t read_ex, write_ex
    ssl_get_error_t get_error
    ssl_pending_t pending
    ssl_get_ptr_t get_rbio, get_wbio, get_ctx
    bio_rw_t bio_write, bio_read
    bio_ctrl_t bio_ctrl
    err_clear_t err_clear
    err_get_t err_get
    err_string_t err_string
    md5_t md5  # (found or not independently of the TLS functions, as the three below)
    md5_t sha256  # (same signature as MD5)
    evp_md_t evp_sha256
    hmac_t hmac

cdef OpenSsl F
cdef int found = -1  # -1 not looked up yet, 0 not available, 1 ready


# The first fields of CPython's objects (Modules/_ssl.c: PySSLSocket, PySSLMemoryBIO,
# PySSLContext); checked against what the functions above say before any is used.
cdef struct SSLSocketHead:
    Py_ssize_t ob_refcnt
    void *ob_type
    void *Socket
    void *ssl
    void *ctx

cdef struct MemoryBIOHead:
    Py_ssize_t ob_refcnt
    void *ob_type
    void *bio

cdef struct ContextHead:
    Py_ssize_t ob_refcnt
    void *ob_type
    void *ctx


cdef void *_sym(void *handle, const char *name) noexcept:
    return dlsym(handle, name)


cdef int _look_up() except -1:
    """Find the OpenSSL functions Python's _ssl module calls; `found` says whether all were."""
    global found
    path = getattr(_ssl, "__file__", None)
    cdef void *handle
    if path:
        handle = dlopen(os.fsencode(path), RTLD_NOW | RTLD_NOLOAD)
    else:  # _ssl built into the interpreter
        handle = dlopen(NULL, RTLD_NOW)
    found = 0
    if handle == NULL:
        return 0
    F.read_ex = <ssl_rw_ex_t>_sym(handle, b"SSL_read_ex")
    F.write_ex = <ssl_rw_ex_t>_sym(handle, b"SSL_write_ex")
    F.get_error = <ssl_get_error_t>_sym(handle, b"SSL_get_error")
    F.pending = <ssl_pending_t>_sym(handle, b"SSL_pending")
    F.get_rbio = <ssl_get_ptr_t>_sym(handle, b"SSL_get_rbio")
    F.get_wbio = <ssl_get_ptr_t>_sym(handle, b"SSL_get_wbio")
    F.get_ctx = <ssl_get_ptr_t>_sym(handle, b"SSL_get_SSL_CTX")
    F.bio_write = <bio_rw_t>_sym(handle, b"BIO_write")
    F.bio_read = <bio_rw_t>_sym(handle, b"BIO_read")
    F.bio_ctrl = <bio_ctrl_t>_sym(handle, b"BIO_ctrl")
    F.err_clear = <err_clear_t>_sym(handle, b"ERR_clear_error")
    F.err_get = <err_get_t>_sym(handle, b"ERR_get_error")
    F.err_string = <err_string_t>_sym(handle, b"ERR_error_string_n")
    F.md5 = <md5_t>_sym(handle, b"MD5")
    F.sha256 = <md5_t>_sym(handle, b"SHA256")
    F.evp_sha256 = <evp_md_t>_sym(handle, b"EVP_sha256")
    F.hmac = <hmac_t>_sym(handle, b"HMAC")
    if (F.read_ex != NULL and F.write_ex != NULL and F.get_error != NULL and F.pending != NULL
            and F.get_rbio != NULL and F.get_wbio != NULL and F.get_ctx != NULL and F.bio_write != NULL
            and F.bio_read != NULL and F.bio_ctrl != NULL and F.err_clear != NULL and F.err_get != NULL
            and F.err_string != NULL):
        found = 1
    return 0


cdef bint _looked_up() noexcept:
    """The functions above looked up (whatever was found)."""
    if found < 0:
        try:
            _look_up()
        except Exception:
            return False
    return True


cdef bint md5_digest(const unsigned char *p, size_t n, unsigned char *out16) noexcept:
    """OpenSSL's MD5 of p[0:n] into out16; False when this OpenSSL has none to offer."""
    if not _looked_up() or F.md5 == NULL:
        return False
    return F.md5(p, n, out16) != NULL


cdef bint sha256_digest(const unsigned char *p, size_t n, unsigned char *out32) noexcept:
    """OpenSSL's SHA-256 of p[0:n] into out32; False when this OpenSSL has none to offer."""
    if not _looked_up() or F.sha256 == NULL:
        return False
    return F.sha256(p, n, out32) != NULL


cdef bint hmac_sha256(const unsigned char *key, int key_len, const unsigned char *p, size_t n,
                      unsigned char *out32) noexcept:
    """OpenSSL's HMAC-SHA-256 of p[0:n] with key[0:key_len] into out32; False when not available."""
    cdef unsigned int got = 0
    cdef const void *md
    if not _looked_up() or F.hmac == NULL or F.evp_sha256 == NULL:
        return False
    md = F.evp_sha256()
    if md == NULL or F.hmac(md, key, key_len, p, n, out32, &got) == NULL:
        return False
    return got == 32


def sha256_available():
    """Whether OpenSSL's SHA-256 and HMAC were found beside Python's _ssl module (the engine's
    SCRAM exchange)."""
    cdef unsigned char out[32]
    return sha256_digest(<const unsigned char *>b"", 0, out) and hmac_sha256(
        <const unsigned char *>b"k", 1, <const unsigned char *>b"", 0, out)


def md5_available():
    """Whether OpenSSL's MD5 was found beside Python's _ssl module (the engine's md5 login)."""
    cdef unsigned char out[16]
    return md5_digest(<const unsigned char *>b"", 0, out)


def available():
    """Whether OpenSSL's functions were found in the scope of Python's _ssl module."""
    if found < 0:
        _look_up()
    return found == 1


cdef bint tls_native_from(object sslobj, object incoming, object outgoing, NativeTls *out) except -1:
    """Fill `out` from an ssl.SSLObject whose handshake is over and its two MemoryBIOs; False
    (out untouched) when this interpreter's objects are not what the checks expect."""
    if found < 0:
        _look_up()
    if found != 1:
        return False
    inner = getattr(sslobj, "_sslobj", None)
    if type(inner) is not _ssl._SSLSocket or type(incoming) is not _ssl.MemoryBIO \
            or type(outgoing) is not _ssl.MemoryBIO:
        return False
    context = inner.context
    if not isinstance(context, _ssl._SSLContext):
        return False
    cdef SSLSocketHead *head = <SSLSocketHead *><PyObject *>inner
    if head.ctx != <void *><PyObject *>context or head.ssl == NULL:
        return False  # not CPython's PySSLSocket layout: keep the Python path
    cdef void *rbio = (<MemoryBIOHead *><PyObject *>incoming).bio
    cdef void *wbio = (<MemoryBIOHead *><PyObject *>outgoing).bio
    if (rbio == NULL or wbio == NULL or F.get_rbio(head.ssl) != rbio or F.get_wbio(head.ssl) != wbio
            or F.get_ctx(head.ssl) != (<ContextHead *><PyObject *>context).ctx):
        return False
    out.ssl = head.ssl
    out.rbio = rbio
    out.wbio = wbio
    return True


cdef int tls_feed(NativeTls *t, const unsigned char *p, Py_ssize_t n) except -1:
    """Records from the socket, for tls_read (a memory BIO takes all of them)."""
    cdef int w
    while n > 0:
        w = F.bio_write(t.rbio, <void *>p, <int>(n if n < INT_MAX else INT_MAX))
        if w <= 0:
            raise MemoryError("TLS input buffer")
        p += w
        n -= w
    return 0


cdef Py_ssize_t tls_read(NativeTls *t, unsigned char *buf, Py_ssize_t cap) noexcept:
    """Plaintext into buf[0:cap]: the byte count (> 0), or TLS_WANT / TLS_EOF / TLS_ERROR when
    none came. An error leaves its text for tls_error_text."""
    cdef Py_ssize_t got = 0
    cdef size_t n = 0
    cdef int err
    F.err_clear()  # SSL_get_error reads the thread's error queue: nothing stale in it
    while got < cap:
        if F.read_ex(t.ssl, buf + got, <size_t>(cap - got), &n) == 1:
            got += <Py_ssize_t>n
            continue
        if got:
            return got  # what failed after it is seen again at the next read
        err = F.get_error(t.ssl, 0)
        if err == SSL_ERROR_WANT_READ:
            return TLS_WANT
        if err == SSL_ERROR_ZERO_RETURN:
            return TLS_EOF
        return TLS_ERROR
    return got


cdef int tls_write(NativeTls *t, const unsigned char *p, Py_ssize_t n) noexcept:
    """Encrypt p[0:n] into the outgoing BIO (taken with tls_output): 0, or TLS_ERROR."""
    cdef size_t done = 0
    if n <= 0:
        return 0
    F.err_clear()
    if F.write_ex(t.ssl, <void *>p, <size_t>n, &done) == 1 and done == <size_t>n:
        return 0
    return TLS_ERROR


cdef Py_ssize_t tls_take_output(NativeTls *t, unsigned char *buf, Py_ssize_t cap) noexcept:
    """Records tls_write (or a read: an alert, a key update's answer) left for the socket, up to
    cap bytes into buf: the count, 0 when none are left."""
    cdef int r
    if cap <= 0 or F.bio_ctrl(t.wbio, BIO_CTRL_PENDING, 0, NULL) <= 0:
        return 0
    r = F.bio_read(t.wbio, buf, <int>(cap if cap < INT_MAX else INT_MAX))
    return r if r > 0 else 0


cdef bint tls_pending(NativeTls *t) noexcept:
    """Plaintext or records already here that no socket event will announce."""
    return F.pending(t.ssl) > 0 or F.bio_ctrl(t.rbio, BIO_CTRL_PENDING, 0, NULL) > 0


cdef str tls_error_text():
    """The reason of the last failed TLS call (OpenSSL's error string); the queue is emptied."""
    cdef char text[256]
    cdef unsigned long e = F.err_get()
    if e == 0:
        return "TLS error"
    F.err_string(e, text, sizeof(text))
    F.err_clear()
    return text.decode("utf-8", "replace")
