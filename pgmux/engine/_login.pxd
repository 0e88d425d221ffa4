# The login's bytes in C (pgmux/engine/_login.pyx), for the engine's C login (Engine._login_read).

cdef enum:
    STARTUP_V3_MAJOR = 3
    PROTOCOL_3_0 = 196608              # a StartupMessage's version word for protocol 3.0
    SSL_REQUEST_CODE = 80877103
    GSSENC_REQUEST_CODE = 80877104
    MAX_STARTUP_PACKET = 0xFFFF        # protocol/messages.py's MAX_STARTUP_PACKET
    MAX_AUTH_MESSAGE = 65535 + 4       # net/client.py's MAX_AUTH_MESSAGE (length word included)
    MD5_INNER_LEN = 32                 # the hex md5 of password + user an md5 login is checked with
    SCRAM_KEY_LEN = 32                 # StoredKey, ServerKey, ClientKey, a proof, a signature
    SCRAM_NONCE_RAW = 18               # PostgreSQL's SCRAM_RAW_NONCE_LEN: the server's part of the nonce
    SCRAM_NONCE_B64 = 24               # ... in base64

cdef inline unsigned int be32(const unsigned char *p) noexcept nogil:
    return (<unsigned int>p[0] << 24) | (<unsigned int>p[1] << 16) | (<unsigned int>p[2] << 8) | p[3]


cdef inline void write_be32(unsigned char *p, unsigned int v) noexcept nogil:
    p[0] = (v >> 24) & 0xFF
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef object startup_params(const unsigned char *p, Py_ssize_t n)
cdef int md5_password_ok(const unsigned char *inner, const unsigned char *salt, const unsigned char *body,
                         Py_ssize_t n) noexcept


cdef class ScramLogin:
    cdef unsigned char stored_key[SCRAM_KEY_LEN]
    cdef unsigned char server_key[SCRAM_KEY_LEN]
    cdef bytes salt_iter               # b",s=<salt in base64>,i=<iterations>": the server-first-message's end
    cdef readonly bytes first_bare     # client-first-message-bare, once scram_first took it
    cdef readonly bytes server_first   # the server-first-message sent
    cdef readonly unsigned char flag   # the gs2 flag, 'n' or 'y'
    cdef Py_ssize_t nonce_len          # the whole nonce's length (server_first[2:2 + nonce_len])

cdef object scram_first(ScramLogin s, const unsigned char *body, Py_ssize_t n, const unsigned char *nonce_raw)
cdef int scram_final(ScramLogin s, const unsigned char *p, Py_ssize_t n, unsigned char *client_key,
                     unsigned char *server_signature) noexcept
cdef Py_ssize_t b64_encode(const unsigned char *src, Py_ssize_t n, unsigned char *dst) noexcept
cdef bytes auth_request(unsigned int code, const unsigned char *data, Py_ssize_t n)
