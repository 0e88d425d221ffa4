# OpenSSL called from C (pgmux/engine/_ossl.pyx): a TLS link's records on the SSL object of an
# ssl.SSLObject whose handshake is over, MD5 for the md5 login, SHA-256 and HMAC for SCRAM. What the
# engine calls.

cdef struct NativeTls:
    void *ssl    # SSL *, owned by the ssl.SSLObject the engine keeps (TlsState.sslobj)
    void *rbio   # its incoming MemoryBIO's BIO *
    void *wbio   # its outgoing MemoryBIO's BIO *

# tls_read's results besides a byte count
cdef enum:
    TLS_WANT = -1     # nothing more until the peer sends
    TLS_EOF = -2      # close_notify: the end of the stream
    TLS_ERROR = -3    # a TLS error (tls_error_text says which)

cdef bint tls_native_from(object sslobj, object incoming, object outgoing, NativeTls *out) except -1
cdef int tls_feed(NativeTls *t, const unsigned char *p, Py_ssize_t n) except -1
cdef Py_ssize_t tls_read(NativeTls *t, unsigned char *buf, Py_ssize_t cap) noexcept
cdef int tls_write(NativeTls *t, const unsigned char *p, Py_ssize_t n) noexcept
cdef Py_ssize_t tls_take_output(NativeTls *t, unsigned char *buf, Py_ssize_t cap) noexcept
cdef bint tls_pending(NativeTls *t) noexcept
cdef str tls_error_text()
cdef bint md5_digest(const unsigned char *p, size_t n, unsigned char *out16) noexcept
cdef bint sha256_digest(const unsigned char *p, size_t n, unsigned char *out32) noexcept
cdef bint hmac_sha256(const unsigned char *key, int key_len, const unsigned char *p, size_t n,
                      unsigned char *out32) noexcept
