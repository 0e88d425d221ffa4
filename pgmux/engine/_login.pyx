# cython: language_level=3, boundscheck=False, wraparound=False
"""The login's bytes in C, for the engine's C login (Engine._login_read): a StartupMessage's
parameters, an md5 PasswordMessage checked against the user's secret, and the common SCRAM
exchange against a stored SCRAM secret. Pure functions over buffers, every length checked
before use.

Python's reader is the reference (protocol/messages.py parse_startup_packet, auth/secrets.py
md5_verify): whatever it would refuse, startup_params returns None for, and the engine then hands
the bytes to Python's login, which refuses them with its own words.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_SetItem
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy

from pgmux.engine._ossl cimport hmac_sha256, md5_digest, sha256_digest

cdef const char *HEX = b"0123456789abcdef"


cdef object startup_params(const unsigned char *p, Py_ssize_t n):
    """The parameters of a protocol-3 StartupMessage, p[0:n] being what follows its length and
    version words, as parse_startup_packet reads them ({name: value}, a later duplicate wins);
    None when parse_startup_packet would refuse the packet."""
    cdef Py_ssize_t end, pos = 0, i, key_pos = 0, key_len = 0, count = 0
    cdef bint have_key = False
    if n < 1 or p[n - 1] != 0:
        return None
    end = n - 1  # (raw[:-1].split(b"\0"): the items are the runs between NULs of p[0:end])
    # how many items: NULs + 1, less one when the last is empty
    for i in range(end):
        if p[i] == 0:
            count += 1
    count += 1
    if end == 0 or p[end - 1] == 0:
        count -= 1
    if count % 2:
        return None
    params = {}
    try:
        while count > 0:
            i = pos
            while i < end and p[i] != 0:
                i += 1
            if not have_key:
                key_pos, key_len, have_key = pos, i - pos, True
            else:
                PyDict_SetItem(params, PyUnicode_DecodeUTF8(<const char *>p + key_pos, key_len, NULL),
                               PyUnicode_DecodeUTF8(<const char *>p + pos, i - pos, NULL))
                have_key = False
            pos = i + 1
            count -= 1
    except UnicodeDecodeError:
        return None
    return params


cdef int md5_password_ok(const unsigned char *inner, const unsigned char *salt, const unsigned char *body,
                         Py_ssize_t n) noexcept:
    """Whether the PasswordMessage body[0:n] ("md5" + 32 hex digits, NUL-terminated) answers the
    md5 challenge of the 4-byte `salt` for `inner` (MD5_INNER_LEN hex digits: md5(password +
    user)): 1 yes, 0 no, -1 MD5 is not available here (Python's login decides then)."""
    cdef unsigned char buf[MD5_INNER_LEN + 4]
    cdef unsigned char digest[16]
    cdef unsigned char diff = 0
    cdef int i
    while n > 0 and body[n - 1] == 0:  # (md5_verify reads the answer with its NULs stripped)
        n -= 1
    for i in range(MD5_INNER_LEN):
        buf[i] = inner[i]
    for i in range(4):
        buf[MD5_INNER_LEN + i] = salt[i]
    if not md5_digest(buf, MD5_INNER_LEN + 4, digest):
        return -1
    if n != 3 + 32 or body[0] != 109 or body[1] != 100 or body[2] != 53:  # "md5"
        return 0
    for i in range(16):  # constant time over the digits, as hmac.compare_digest
        diff |= body[3 + 2 * i] ^ <unsigned char>HEX[digest[i] >> 4]
        diff |= body[4 + 2 * i] ^ <unsigned char>HEX[digest[i] & 15]
    return 1 if diff == 0 else 0


def startup_params_py(data: bytes):
    """startup_params over a bytes object (tests compare it with parse_startup_packet)."""
    return startup_params(data, len(data))


def md5_password_ok_py(inner: bytes, salt: bytes, body: bytes) -> int:
    """md5_password_ok over bytes objects (tests)."""
    if len(inner) != MD5_INNER_LEN or len(salt) != 4:
        raise ValueError("inner: 32 hex digits, salt: 4 bytes")
    return md5_password_ok(inner, salt, body, len(body))


# ------------------------------------------------------------------------------------------ SCRAM
# The common SCRAM-SHA-256 exchange of a client whose auth_file secret is a stored SCRAM secret
# (Engine._login_read, states CL_SASL_FIRST and CL_SASL_FINAL). The reference is Python's
# exchange (auth/scram.py ScramServer): whatever is not the plain form below is handed to it, with
# this exchange's state (ScramLogin), and it answers as it always does:
#   SASLInitialResponse: mechanism "SCRAM-SHA-256", data "n,,n=<user>,r=<nonce>" (or "y,,"), no
#     authzid, no extension; the nonce printable ASCII without ','.
#   SASLResponse: "c=biws,r=<nonce>,p=<proof>" ("c=eSws" after "y,,"), no extension, the proof 44
#     base64 characters (32 bytes).

cdef const char *B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
cdef const char *MECHANISM = b"SCRAM-SHA-256"  # (14 bytes with its NUL)


cdef Py_ssize_t b64_encode(const unsigned char *src, Py_ssize_t n, unsigned char *dst) noexcept:
    """Standard base64 (padded) of src[0:n] into dst, which has room for 4 * ((n + 2) / 3) bytes:
    how many it wrote."""
    cdef Py_ssize_t i = 0, o = 0
    cdef unsigned int v
    while i + 3 <= n:
        v = (src[i] << 16) | (src[i + 1] << 8) | src[i + 2]
        dst[o] = B64[v >> 18]
        dst[o + 1] = B64[(v >> 12) & 63]
        dst[o + 2] = B64[(v >> 6) & 63]
        dst[o + 3] = B64[v & 63]
        i += 3
        o += 4
    if n - i == 1:
        v = src[i] << 16
        dst[o] = B64[v >> 18]
        dst[o + 1] = B64[(v >> 12) & 63]
        dst[o + 2] = 61  # '='
        dst[o + 3] = 61
        o += 4
    elif n - i == 2:
        v = (src[i] << 16) | (src[i + 1] << 8)
        dst[o] = B64[v >> 18]
        dst[o + 1] = B64[(v >> 12) & 63]
        dst[o + 2] = B64[(v >> 6) & 63]
        dst[o + 3] = 61
        o += 4
    return o


cdef int b64_value(unsigned char c) noexcept:
    if 65 <= c <= 90:
        return c - 65
    if 97 <= c <= 122:
        return c - 71
    if 48 <= c <= 57:
        return c + 4
    if c == 43:  # '+'
        return 62
    if c == 47:  # '/'
        return 63
    return -1


cdef bint b64_decode_key(const unsigned char *src, Py_ssize_t n, unsigned char *out) noexcept:
    """src[0:n], 44 base64 characters ending in one '=' whose unused bits are zero (what
    base64.b64encode makes of 32 bytes), decoded into out[0:32]; False for anything else."""
    cdef Py_ssize_t i, o = 0
    cdef int a, b, c, d
    if n != 44 or src[43] != 61:
        return False
    for i in range(0, 40, 4):
        a = b64_value(src[i])
        b = b64_value(src[i + 1])
        c = b64_value(src[i + 2])
        d = b64_value(src[i + 3])
        if a < 0 or b < 0 or c < 0 or d < 0:
            return False
        out[o] = <unsigned char>((a << 2) | (b >> 4))
        out[o + 1] = <unsigned char>(((b & 15) << 4) | (c >> 2))
        out[o + 2] = <unsigned char>(((c & 3) << 6) | d)
        o += 3
    a = b64_value(src[40])
    b = b64_value(src[41])
    c = b64_value(src[42])
    if a < 0 or b < 0 or c < 0 or (c & 3):
        return False
    out[30] = <unsigned char>((a << 2) | (b >> 4))
    out[31] = <unsigned char>(((b & 15) << 4) | (c >> 2))
    return True


cdef bytes auth_request(unsigned int code, const unsigned char *data, Py_ssize_t n):
    """An Authentication* message ('R', length, `code`, data[0:n]) as a bytes object."""
    message = PyBytes_FromStringAndSize(NULL, 9 + n)
    cdef unsigned char *out = <unsigned char *>PyBytes_AS_STRING(message)
    out[0] = 82  # 'R'
    write_be32(out + 1, <unsigned int>(8 + n))
    write_be32(out + 5, code)
    memcpy(out + 9, data, n)
    return message


cdef class ScramLogin:
    """One client's SCRAM exchange run by the engine: the secret's keys, then what its first
    message and the answer to it were (Python's ScramServer.resumed takes over from these)."""

    def __init__(self, bytes stored_key, bytes server_key, bytes salt_iter):
        if len(stored_key) != SCRAM_KEY_LEN or len(server_key) != SCRAM_KEY_LEN:
            raise ValueError("SCRAM keys are 32 bytes")
        memcpy(self.stored_key, <const char *>stored_key, SCRAM_KEY_LEN)
        memcpy(self.server_key, <const char *>server_key, SCRAM_KEY_LEN)
        self.salt_iter = salt_iter
        self.flag = 0


cdef object scram_first(ScramLogin s, const unsigned char *body, Py_ssize_t n, const unsigned char *nonce_raw):
    """A SASLInitialResponse's body (body[0:n]) in the plain form: the server-first-message that
    answers it, with `nonce_raw` (SCRAM_NONCE_RAW random bytes) as the server's part of the
    nonce, and `s` then knows the exchange so far; None for anything else (Python's exchange)."""
    cdef Py_ssize_t data, i, nonce_at
    cdef unsigned char c
    cdef unsigned char encoded[SCRAM_NONCE_B64]
    if n < 14 + 4 or memcmp(body, MECHANISM, 14) != 0:
        return None
    if be32(body + 14) != n - 18:  # (-1, no data, reads 0xFFFFFFFF: never equal)
        return None
    data = 18
    # gs2 header "n,," or "y,,", then "n=<user>,r=<nonce>"
    if n - data < 8 or (body[data] != 110 and body[data] != 121) or body[data + 1] != 44 or body[data + 2] != 44:
        return None
    if body[data + 3] != 110 or body[data + 4] != 61:  # "n="
        return None
    i = data + 5
    while i < n and body[i] != 44:  # the user name (ignored, as by Python's exchange): no NUL
        if body[i] == 0:
            return None
        i += 1
    if i + 3 > n or body[i + 1] != 114 or body[i + 2] != 61:  # ",r="
        return None
    nonce_at = i + 3
    if nonce_at >= n:
        return None
    for i in range(nonce_at, n):
        c = body[i]
        if c < 0x21 or c > 0x7E or c == 44:  # printable, no ',' (an extension follows: Python)
            return None
    b64_encode(nonce_raw, SCRAM_NONCE_RAW, encoded)
    s.flag = body[data]
    s.first_bare = PyBytes_FromStringAndSize(<const char *>body + data + 3, n - data - 3)
    s.server_first = (b"r=" + PyBytes_FromStringAndSize(<const char *>body + nonce_at, n - nonce_at)
                      + PyBytes_FromStringAndSize(<const char *>encoded, SCRAM_NONCE_B64) + s.salt_iter)
    s.nonce_len = n - nonce_at + SCRAM_NONCE_B64
    return s.server_first


cdef int scram_final(ScramLogin s, const unsigned char *p, Py_ssize_t n, unsigned char *client_key,
                     unsigned char *server_signature) noexcept:
    """A SASLResponse's data (p[0:n]) after scram_first: 1 the proof is right (client_key and
    server_signature, 32 bytes each, filled in), 0 it is wrong, -1 not the plain form (Python's
    exchange decides), -2 SHA-256/HMAC not available."""
    cdef const unsigned char *nonce
    cdef Py_ssize_t head, proof_at, first_len, server_len, total, i
    cdef unsigned char proof[SCRAM_KEY_LEN]
    cdef unsigned char signature[SCRAM_KEY_LEN]
    cdef unsigned char digest[SCRAM_KEY_LEN]
    cdef unsigned char *message
    cdef unsigned char diff = 0
    cdef bint ok
    if s.server_first is None or s.first_bare is None:
        return -1
    # "c=biws,r=" (or "c=eSws,r="), the nonce, ",p=", 44 characters
    head = 9
    proof_at = head + s.nonce_len + 3
    if n != proof_at + 44 or p[0] != 99 or p[1] != 61 or p[6] != 44 or p[7] != 114 or p[8] != 61:
        return -1
    if memcmp(p + 2, <const char *>(b"biws" if s.flag == 110 else b"eSws"), 4) != 0:
        return -1
    nonce = <const unsigned char *>PyBytes_AS_STRING(s.server_first) + 2
    for i in range(s.nonce_len):
        diff |= p[head + i] ^ nonce[i]
    if diff or p[proof_at - 3] != 44 or p[proof_at - 2] != 112 or p[proof_at - 1] != 61:  # ",p="
        return -1
    if not b64_decode_key(p + proof_at, 44, proof):
        return -1
    # AuthMessage = client-first-message-bare "," server-first-message "," client-final-without-proof
    first_len = PyBytes_GET_SIZE(s.first_bare)
    server_len = PyBytes_GET_SIZE(s.server_first)
    total = first_len + 1 + server_len + 1 + proof_at - 3
    message = <unsigned char *>malloc(total)
    if message == NULL:
        return -2
    memcpy(message, PyBytes_AS_STRING(s.first_bare), first_len)
    message[first_len] = 44
    memcpy(message + first_len + 1, PyBytes_AS_STRING(s.server_first), server_len)
    message[first_len + 1 + server_len] = 44
    memcpy(message + first_len + 2 + server_len, p, proof_at - 3)
    ok = (hmac_sha256(s.stored_key, SCRAM_KEY_LEN, message, total, signature)
          and hmac_sha256(s.server_key, SCRAM_KEY_LEN, message, total, server_signature))
    free(message)
    if not ok:
        return -2
    for i in range(SCRAM_KEY_LEN):
        client_key[i] = proof[i] ^ signature[i]
    if not sha256_digest(client_key, SCRAM_KEY_LEN, digest):
        return -2
    diff = 0
    for i in range(SCRAM_KEY_LEN):  # constant time, as hmac.compare_digest
        diff |= digest[i] ^ s.stored_key[i]
    return 1 if diff == 0 else 0


def scram_first_py(ScramLogin s not None, body: bytes, nonce_raw: bytes):
    """scram_first over bytes objects (tests compare it with ScramServer)."""
    if len(nonce_raw) != SCRAM_NONCE_RAW:
        raise ValueError("nonce_raw: 18 bytes")
    return scram_first(s, body, len(body), nonce_raw)


def scram_final_py(ScramLogin s not None, data: bytes):
    """scram_final over a bytes object: (result, client_key, server_signature)."""
    cdef unsigned char key[SCRAM_KEY_LEN]
    cdef unsigned char sig[SCRAM_KEY_LEN]
    r = scram_final(s, data, len(data), key, sig)
    if r != 1:
        return r, None, None
    return r, PyBytes_FromStringAndSize(<const char *>key, SCRAM_KEY_LEN), PyBytes_FromStringAndSize(
        <const char *>sig, SCRAM_KEY_LEN)


def b64_encode_py(data: bytes) -> bytes:
    out = bytearray(4 * ((len(data) + 2) // 3))
    cdef unsigned char[::1] view = out
    n = b64_encode(data, len(data), &view[0]) if len(out) else 0
    return bytes(out[:n])


def b64_decode_key_py(text: bytes):
    cdef unsigned char out[SCRAM_KEY_LEN]
    if not b64_decode_key(text, len(text), out):
        return None
    return PyBytes_FromStringAndSize(<const char *>out, SCRAM_KEY_LEN)
