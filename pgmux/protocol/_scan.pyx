# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled twin of pgmux.protocol.scanner.scan (same arguments, same results).

Optional: built when a C compiler and Cython are present; the pure-Python version stays the
reference, and tests/unit/test_scanner.py checks that both agree on random streams.
"""

from pgmux.protocol.messages import ProtocolError


def scan(const unsigned char[::1] buf, Py_ssize_t pos, Py_ssize_t end, const unsigned char[::1] need_body,
         const unsigned char[::1] notify, list events, unsigned long long max_length=0x7FFFFFFF):
    cdef Py_ssize_t nxt
    cdef unsigned long long length
    cdef unsigned char typ
    while True:
        if end - pos < 5:
            return pos, 0
        typ = buf[pos]
        length = ((<unsigned long long>buf[pos + 1] << 24) | (<unsigned long long>buf[pos + 2] << 16)
                  | (<unsigned long long>buf[pos + 3] << 8) | buf[pos + 4])
        if length < 4 or length > max_length:
            raise ProtocolError(f"bad packet header: '{bytes(buf[pos:pos + 5]).hex()}'")
        nxt = pos + 1 + <Py_ssize_t>length
        if need_body[typ]:
            if nxt > end:
                return pos, 0
            events.append((typ, pos, nxt))
        elif notify[typ]:
            events.append((typ, pos, nxt))
        if nxt >= end:
            return end, nxt - end
        pos = nxt
