# cython: language_level=3, boundscheck=False, wraparound=False
"""The login's bytes in C, for the engine's C login (Engine._login_read): a StartupMessage's
parameters, and an md5 PasswordMessage checked against the user's secret. Pure functions over
buffers, every length checked before use.

Python's reader is the reference (protocol/messages.py parse_startup_packet, auth/secrets.py
md5_verify): whatever it would refuse, startup_params returns None for, and the engine then hands
the bytes to Python's login, which refuses them with its own words.
"""

from cpython.dict cimport PyDict_SetItem
from cpython.unicode cimport PyUnicode_DecodeUTF8

from pgmux.engine._ossl cimport md5_digest

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
