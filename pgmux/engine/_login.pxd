# The login's bytes in C (pgmux/engine/_login.pyx), for the engine's C login (Engine._login_read).

cdef enum:
    STARTUP_V3_MAJOR = 3
    PROTOCOL_3_0 = 196608              # a StartupMessage's version word for protocol 3.0
    SSL_REQUEST_CODE = 80877103
    GSSENC_REQUEST_CODE = 80877104
    MAX_STARTUP_PACKET = 0xFFFF        # protocol/messages.py's MAX_STARTUP_PACKET
    MAX_AUTH_MESSAGE = 65535 + 4       # net/client.py's MAX_AUTH_MESSAGE (length word included)
    MD5_INNER_LEN = 32                 # the hex md5 of password + user an md5 login is checked with

cdef object startup_params(const unsigned char *p, Py_ssize_t n)
cdef int md5_password_ok(const unsigned char *inner, const unsigned char *salt, const unsigned char *body,
                         Py_ssize_t n) noexcept
