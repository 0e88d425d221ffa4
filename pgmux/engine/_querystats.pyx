# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Per-query statistics in C (see _querystats.pxd): the normalizer and the bounded table.

The engine calls `lookup()` for each Query and Parse it forwards and `record()` at the
ReadyForQuery that answers it; neither allocates a Python object unless the statement is new.
Every index is checked against the text's length before it is read.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset

# ------------------------------------------------------------------ the normalizer
#
# One pass over the text. The hash sees tokens, not bytes: each word (folded to lower case), quoted
# identifier, punctuation byte or placeholder is mixed in with its kind and length, eight bytes per
# multiply, so spacing and comments cannot change it and `a=1`, `a = 1` agree. The text (written
# only for a new row) keeps the first statement's spelling, one space where it had any.

ctypedef struct Norm:
    unsigned char *out      # the normalized text, up to QS_TEXT_MAX bytes (only when writing it)
    int len
    unsigned long long h    # the fingerprint


# Byte classes (bits) and the lower-case table, filled once at import.
cdef enum:
    C_SPACE = 1
    C_IDSTART = 2   # a letter, _ or a byte >= 128
    C_DIGIT = 4
    C_IDCHAR = 8    # may continue an identifier: C_IDSTART, C_DIGIT or $

cdef unsigned char CLS[256]

cdef unsigned long long SEED = 0x243F6A8885A308D3ULL
cdef unsigned long long K_WORD = 0x1000000000000000ULL
cdef unsigned long long K_QUOTED = 0x2000000000000000ULL
cdef unsigned long long K_PUNCT = 0x3000000000000000ULL
cdef unsigned long long K_PARAM = 0x4000000000000000ULL
cdef unsigned long long LOW_MASK[9]


cdef void fill_tables() noexcept:
    cdef int ch
    for ch in range(256):
        CLS[ch] = 0
        if ch == 32 or 9 <= ch <= 13:
            CLS[ch] = C_SPACE
        elif 97 <= ch <= 122 or 65 <= ch <= 90 or ch == 95 or ch >= 128:
            CLS[ch] = C_IDSTART | C_IDCHAR
        elif 48 <= ch <= 57:
            CLS[ch] = C_DIGIT | C_IDCHAR
        elif ch == 36:
            CLS[ch] = C_IDCHAR
    LOW_MASK[0] = 0
    for ch in range(1, 8):
        LOW_MASK[ch] = (1ULL << (8 * ch)) - 1
    LOW_MASK[8] = 0xFFFFFFFFFFFFFFFFULL


fill_tables()


cdef inline bint is_digit(unsigned char ch) noexcept nogil:
    return (CLS[ch] & C_DIGIT) != 0


cdef inline bint is_ident_char(unsigned char ch) noexcept nogil:
    return (CLS[ch] & C_IDCHAR) != 0


cdef inline unsigned long long mix(unsigned long long h) noexcept nogil:
    h *= 0x9E3779B97F4A7C15ULL
    return h ^ (h >> 29)


cdef inline unsigned long long fold8(unsigned long long x) noexcept nogil:
    """ASCII A-Z to a-z in eight bytes at once (SWAR); every other byte as it is."""
    cdef unsigned long long low7 = x & 0x7F7F7F7F7F7F7F7FULL
    cdef unsigned long long from_a = low7 + 0x3F3F3F3F3F3F3F3FULL  # high bit: byte >= 'A'
    cdef unsigned long long past_z = low7 + 0x2525252525252525ULL  # high bit: byte > 'Z'
    return x | (((from_a & ~past_z & ~x) & 0x8080808080808080ULL) >> 2)


cdef inline unsigned long long hash_span(unsigned long long h, const unsigned char *p, Py_ssize_t k,
                                         const unsigned char *end, bint fold, unsigned long long kind) noexcept nogil:
    """Mix the token p[0:k] (k >= 1, within `end`) into h, eight bytes at a time."""
    cdef unsigned long long x
    cdef Py_ssize_t t
    h = mix(h ^ kind ^ (<unsigned long long>(k & 0xFFFFFF) << 32))
    while k >= 8:
        memcpy(&x, p, 8)
        h = mix(h ^ (fold8(x) if fold else x))
        p += 8
        k -= 8
    if k > 0:
        if end - p >= 8:  # eight readable bytes: one load, the extra ones masked off
            memcpy(&x, p, 8)
            x &= LOW_MASK[k]
        else:
            x = 0
            for t in range(k):
                x |= (<unsigned long long>p[t]) << (8 * t)
        h = mix(h ^ (fold8(x) if fold else x))
    return h


cdef inline void n_text(Norm *s, const unsigned char *p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t room = QS_TEXT_MAX - s.len
    if n > room:
        n = room
    if n > 0:
        memcpy(s.out + s.len, p, n)
        s.len += <int>n


cdef void n_param_text(Norm *s, int number) noexcept nogil:
    """`$number`, the text of a placeholder."""
    cdef unsigned char digits[12]
    cdef unsigned char buf[13]
    cdef int k = 0, i
    buf[0] = 36
    while number > 0 and k < 12:
        digits[k] = 48 + number % 10
        number //= 10
        k += 1
    for i in range(k):
        buf[1 + i] = digits[k - 1 - i]
    n_text(s, buf, k + 1)


cdef Py_ssize_t skip_string(const unsigned char *q, Py_ssize_t j, Py_ssize_t n, bint backslash) noexcept nogil:
    """From just after an opening quote: the index after the closing one ('' is a quote inside;
    with E'' a backslash escapes the next byte). An unterminated string runs to the end."""
    while j < n:
        if backslash and q[j] == 92:
            j += 2
            continue
        if q[j] == 39:
            if j + 1 < n and q[j + 1] == 39:
                j += 2
                continue
            return j + 1
        j += 1
    return n


cdef Py_ssize_t skip_digits(const unsigned char *q, Py_ssize_t j, Py_ssize_t n) noexcept nogil:
    while j < n and is_digit(q[j]):
        j += 1
    return j


cdef Py_ssize_t skip_number(const unsigned char *q, Py_ssize_t j, Py_ssize_t n) noexcept nogil:
    """digits [. digits] [e [+-] digits], from its first byte."""
    cdef Py_ssize_t k
    j = skip_digits(q, j, n)
    if j < n and q[j] == 46:
        j = skip_digits(q, j + 1, n)
    if j < n and (q[j] == 101 or q[j] == 69):
        k = j + 1
        if k < n and (q[k] == 43 or q[k] == 45):
            k += 1
        if k < n and is_digit(q[k]):
            j = skip_digits(q, k, n)
    return j


cdef Py_ssize_t skip_dollar_quote(const unsigned char *q, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """At a `$`: the end of a $tag$...$tag$ string, or -1 when this `$` starts none."""
    cdef Py_ssize_t j = i + 1, tl, k
    if j < n and is_digit(q[j]):
        return -1
    while j < n and q[j] != 36 and is_ident_char(q[j]):
        j += 1
    if j >= n or q[j] != 36:
        return -1
    tl = j + 1 - i  # the tag with both dollars
    k = j + 1
    while k + tl <= n:
        if q[k] == 36 and memcmp(q + k, q + i, tl) == 0:
            return k + tl
        k += 1
    return n


cdef Py_ssize_t skip_comment(const unsigned char *q, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """At `--` or `/*`: the index after the comment (block comments nest, as PostgreSQL's)."""
    cdef int depth = 1
    if q[i] == 45:
        while i < n and q[i] != 10:
            i += 1
        return i
    i += 2
    while i < n and depth:
        if q[i] == 47 and i + 1 < n and q[i + 1] == 42:
            depth += 1
            i += 2
        elif q[i] == 42 and i + 1 < n and q[i + 1] == 47:
            depth -= 1
            i += 2
        else:
            i += 1
    return i


cdef void normalize_into(Norm *s, const unsigned char *q, Py_ssize_t n, bint text) noexcept nogil:
    """The fingerprint of q[0:n] as a normalized statement (s.h), and its text when `text` is set
    (s.out, s.len). Constants and parameters become $1, $2...; trailing semicolons go."""
    cdef const unsigned char *end = q + n
    cdef unsigned long long h = SEED
    cdef Py_ssize_t i = 0, j
    cdef unsigned char ch, lo, cls
    cdef bint space = False, semi_space = False, param
    cdef bint operand = False  # the last token can end an operand (a name, a value, `)` or `]`)
    cdef int semis = 0, params = 0, k
    cdef unsigned char sp = 32, semi = 59
    s.len = 0
    while i < n:
        ch = q[i]
        cls = CLS[ch]
        if cls & C_SPACE:
            space = True
            i += 1
            continue
        if (ch == 45 and i + 1 < n and q[i + 1] == 45) or (ch == 47 and i + 1 < n and q[i + 1] == 42):
            i = skip_comment(q, i, n)
            space = True
            continue
        if ch == 59:  # ; written only if a token follows
            if not semis:
                semi_space = space
            space = False
            semis += 1
            i += 1
            continue
        # a token starts here
        if semis:
            for k in range(semis):
                h = mix(h ^ K_PUNCT ^ 59)
            if text:
                if semi_space and s.len:
                    n_text(s, &sp, 1)
                for k in range(semis):
                    n_text(s, &semi, 1)
            semis = 0
        if text and space and s.len:
            n_text(s, &sp, 1)
        space = False
        param = False
        if cls & C_IDSTART:
            j = i + 1
            while j < n and CLS[q[j]] & C_IDCHAR:
                j += 1
            lo = ch | 32
            if j - i == 1 and j < n and q[j] == 39 and (lo == 101 or lo == 98 or lo == 120 or lo == 110):
                j = skip_string(q, j + 1, n, lo == 101)  # E'', B'', X'', N''
                param = True
            elif j - i == 1 and lo == 117 and j + 1 < n and q[j] == 38 and q[j + 1] == 39:
                j = skip_string(q, j + 2, n, False)  # U&''
                param = True
            else:
                h = hash_span(h, q + i, j - i, end, True, K_WORD)
                if text:
                    n_text(s, q + i, j - i)
        elif cls & C_DIGIT or (ch == 46 and i + 1 < n and is_digit(q[i + 1])):
            j = skip_number(q, i, n)
            param = True
        elif (ch == 45 and not operand and i + 1 < n
              and (is_digit(q[i + 1]) or (q[i + 1] == 46 and i + 2 < n and is_digit(q[i + 2])))):
            j = skip_number(q, i + 1, n)  # -5 after an operator: one constant, as PostgreSQL folds it
            param = True
        elif ch == 39:  # 'string'
            j = skip_string(q, i + 1, n, False)
            param = True
        elif ch == 34:  # "quoted identifier": kept as written
            j = i + 1
            while j < n:
                if q[j] == 34:
                    if j + 1 < n and q[j + 1] == 34:
                        j += 2
                        continue
                    j += 1
                    break
                j += 1
            if j > n:
                j = n
            h = hash_span(h, q + i, j - i, end, False, K_QUOTED)
            if text:
                n_text(s, q + i, j - i)
        elif ch == 36 and i + 1 < n and is_digit(q[i + 1]):  # $1
            j = skip_digits(q, i + 1, n)
            param = True
        elif ch == 36 and skip_dollar_quote(q, i, n) >= 0:  # $tag$ ... $tag$
            j = skip_dollar_quote(q, i, n)
            param = True
        else:  # punctuation, one byte a token
            j = i + 1
            h = mix(h ^ K_PUNCT ^ ch)
            if text:
                n_text(s, q + i, 1)
        operand = param or ch == 41 or ch == 93 or ch == 34 or (cls & C_IDSTART) != 0
        if param:
            h = mix(h ^ K_PARAM)
            params += 1
            if text:
                n_param_text(s, params)
        i = j
    if h < 2:
        h += 2  # 0 marks an "other" row
    s.h = h


def normalize(data):
    """(fingerprint, normalized text) of a statement text (bytes): what the table keys on."""
    cdef const unsigned char[::1] view = data
    cdef Norm s
    cdef unsigned char out[QS_TEXT_MAX]
    s.out = out
    normalize_into(&s, &view[0] if view.shape[0] else <const unsigned char *>b"", view.shape[0], True)
    return s.h, PyBytes_FromStringAndSize(<char *>out, s.len).decode("utf-8", "replace")


# ------------------------------------------------------------------ latency buckets

cdef extern from *:
    int __builtin_clzll(unsigned long long) nogil


cdef inline int bit_length(unsigned long long v) noexcept nogil:
    return 64 - __builtin_clzll(v) if v else 0


cdef inline int bucket_of(long long us) noexcept nogil:
    """4 buckets per power of two: bucket i >= 4 holds [(4 + i % 4) << (b - 2), (5 + i % 4) << (b - 2))
    with b = i // 4 + 1; buckets 0-3 hold 0-3 us exactly."""
    cdef int b
    if us < 4:
        return <int>us if us > 0 else 0
    b = bit_length(<unsigned long long>us) - 1
    if b > 40:
        return QS_BUCKETS - 1
    return 4 * (b - 1) + <int>((us >> (b - 2)) & 3)


cdef inline long long bucket_upper(int i) noexcept nogil:
    cdef int b
    if i < 4:
        return i
    b = i // 4 + 1
    return ((<long long>(5 + i % 4)) << (b - 2)) - 1


cdef long long percentile(const unsigned int *hist, long long calls, double p, long long lo,
                          long long hi) noexcept nogil:
    """Nearest rank: the upper bound of the bucket holding the ceil(p * calls)-th duration,
    clamped to [lo, hi] (the least and most seen): at most a quarter above the true value."""
    cdef long long rank, seen = 0, v
    cdef int i
    if calls <= 0:
        return 0
    rank = <long long>(p * calls)
    if rank < p * calls:
        rank += 1
    if rank < 1:
        rank = 1
    for i in range(QS_BUCKETS):
        seen += hist[i]
        if seen >= rank:
            v = bucket_upper(i)
            if v > hi:
                v = hi
            if v < lo:
                v = lo
            return v
    return hi


def percentiles_of(bytes hist, long long calls, long long lo, long long hi):
    """(p50, p95, p99) of a histogram exported with export(hist=True), e.g. one merged from
    several workers' (pgmux/stats/queries.py)."""
    if len(hist) != QS_BUCKETS * sizeof(unsigned int):
        raise ValueError("not a query-statistics histogram")
    cdef const unsigned int *h = <const unsigned int *><const char *>hist
    return percentile(h, calls, 0.50, lo, hi), percentile(h, calls, 0.95, lo, hi), percentile(h, calls, 0.99, lo, hi)


def bucket(long long us):
    """The histogram bucket of a duration (for tests)."""
    return bucket_of(us)


BUCKETS = QS_BUCKETS


# ------------------------------------------------------------------ the table

cdef inline unsigned long long slot_hash(unsigned long long fp, int pool) noexcept nogil:
    cdef unsigned long long h = fp ^ ((<unsigned long long>pool + 1) * 0x9E3779B97F4A7C15ULL)
    h ^= h >> 29
    return h


cdef void clear_counters(QEntry *e) noexcept nogil:
    e.calls = e.errors = e.rows = e.total_us = e.wait_us = e.max_us = 0
    e.min_us = 0x7FFFFFFFFFFFFFFF
    memset(e.hist, 0, sizeof(e.hist))


cdef void add_counters(QEntry *into, const QEntry *e) noexcept nogil:
    cdef int i
    if not e.calls:
        return
    into.calls += e.calls
    into.errors += e.errors
    into.rows += e.rows
    into.total_us += e.total_us
    into.wait_us += e.wait_us
    if e.min_us < into.min_us:
        into.min_us = e.min_us
    if e.max_us > into.max_us:
        into.max_us = e.max_us
    for i in range(QS_BUCKETS):
        into.hist[i] += e.hist[i]


cdef class QueryStats:
    """See _querystats.pxd."""

    def __cinit__(self):
        self.entries = NULL
        self.slots = NULL
        self.others = NULL
        self.head = self.tail = -1
        self.norm = <unsigned char *>malloc(QS_TEXT_MAX)
        if self.norm == NULL:
            raise MemoryError()

    def __init__(self, int max_entries=5000):
        self.pools = []
        self.pool_ids = {}
        self.enabled = True
        self.next_gen = 1
        self.configure(max_entries)

    def __dealloc__(self):
        self._free_texts()
        free(self.entries)
        free(self.slots)
        free(self.others)
        free(self.norm)

    cdef void _free_texts(self) noexcept:
        cdef int i
        if self.entries != NULL:
            for i in range(self.used):
                free(self.entries[i].text)
                self.entries[i].text = NULL

    # -------------------------------------------------------------- configuration

    def configure(self, int max_entries):
        """Hold at most `max_entries` statements (query_stats_max): the least recently used go
        to their pools' "other" rows when the table shrinks."""
        cdef int idx, nslots = 16
        cdef QEntry *ne
        cdef int *ns
        if max_entries < 1:
            max_entries = 1
        while self.used > max_entries:
            idx = self.tail
            self._evict(idx)
            if idx != self.used - 1:  # keep entries dense: the last one moves into the hole
                self._move(self.used - 1, idx)
            self.used -= 1
        while nslots < 2 * max_entries:
            nslots *= 2
        ns = <int *>malloc(nslots * sizeof(int))
        if ns == NULL:
            raise MemoryError()
        if max_entries != self.cap:
            ne = <QEntry *>realloc(self.entries, max_entries * sizeof(QEntry))
            if ne == NULL:
                free(ns)
                raise MemoryError()
            self.entries = ne
            self.cap = max_entries
        free(self.slots)
        self.slots = ns
        self.mask = nslots - 1
        self._rehash()

    cdef void _rehash(self) noexcept:
        cdef int i
        memset(self.slots, 0xFF, (self.mask + 1) * sizeof(int))
        for i in range(self.used):
            self._place(i)

    cdef void _place(self, int idx) noexcept:
        cdef unsigned int i = slot_hash(self.entries[idx].fp, self.entries[idx].pool) & self.mask
        while self.slots[i] != -1:
            i = (i + 1) & self.mask
        self.slots[i] = idx

    def pool_id(self, str database, str user):
        """The id of a (database, user) pair for PoolCore.qpool; the same pair keeps its id."""
        key = (database, user)
        pid = self.pool_ids.get(key)
        if pid is not None:
            return pid
        pid = len(self.pools)
        others = <QEntry *>realloc(self.others, (pid + 1) * sizeof(QEntry))
        if others == NULL:
            raise MemoryError()
        self.others = others
        memset(&self.others[pid], 0, sizeof(QEntry))
        self.others[pid].pool = pid
        clear_counters(&self.others[pid])
        self.n_others = pid + 1
        self.pools.append(key)
        self.pool_ids[key] = pid
        return pid

    def reset(self):
        """RESET QUERIES: every row goes, "other" rows are zeroed; pool ids stay."""
        cdef int i
        self._free_texts()
        self.used = 0
        self.head = self.tail = -1
        memset(self.slots, 0xFF, (self.mask + 1) * sizeof(int))
        for i in range(self.n_others):
            clear_counters(&self.others[i])
        self.evictions = 0

    # -------------------------------------------------------------- the hot path

    cdef void _unlink(self, int idx) noexcept:
        cdef QEntry *e = &self.entries[idx]
        if e.prev >= 0:
            self.entries[e.prev].next = e.next
        else:
            self.head = e.next
        if e.next >= 0:
            self.entries[e.next].prev = e.prev
        else:
            self.tail = e.prev

    cdef void _push_front(self, int idx) noexcept:
        cdef QEntry *e = &self.entries[idx]
        e.prev = -1
        e.next = self.head
        if self.head >= 0:
            self.entries[self.head].prev = idx
        self.head = idx
        if self.tail < 0:
            self.tail = idx

    cdef void _unslot(self, int idx) noexcept:
        """Remove idx from the open-addressing table (backward-shift deletion)."""
        cdef unsigned int i = slot_hash(self.entries[idx].fp, self.entries[idx].pool) & self.mask, j, home
        cdef int k
        while self.slots[i] != idx:
            if self.slots[i] == -1:
                return
            i = (i + 1) & self.mask
        j = i
        while True:
            j = (j + 1) & self.mask
            k = self.slots[j]
            if k == -1:
                break
            home = slot_hash(self.entries[k].fp, self.entries[k].pool) & self.mask
            # k may move into the hole at i if its home is not cyclically in (i, j]
            if (j > i and (home <= i or home > j)) or (j < i and (home <= i and home > j)):
                self.slots[i] = k
                i = j
        self.slots[i] = -1

    cdef void _evict(self, int idx) noexcept:
        """Fold a row into its pool's other row and forget it (its entry is reused or moved by
        the caller)."""
        cdef QEntry *e = &self.entries[idx]
        if e.pool < self.n_others:
            add_counters(&self.others[e.pool], e)
        self._unslot(idx)
        self._unlink(idx)
        free(e.text)
        e.text = NULL
        self.evictions += 1

    cdef void _move(self, int src, int dst) noexcept:
        cdef QEntry *e = &self.entries[src]
        cdef unsigned int i = slot_hash(e.fp, e.pool) & self.mask
        while self.slots[i] != src:
            i = (i + 1) & self.mask
        self.slots[i] = dst
        memcpy(&self.entries[dst], e, sizeof(QEntry))
        e = &self.entries[dst]
        if e.prev >= 0:
            self.entries[e.prev].next = dst
        else:
            self.head = dst
        if e.next >= 0:
            self.entries[e.next].prev = dst
        else:
            self.tail = dst
        e.gen = self.next_gen  # (configure only) handles in flight to src now miss: the other row
        self.next_gen = (self.next_gen + 1) & 0x7FFFFFFF

    cdef long long lookup(self, int pool, const unsigned char *q, Py_ssize_t n) noexcept:
        cdef Norm s
        cdef unsigned int i
        cdef int idx
        cdef QEntry *e
        cdef char *text
        if not self.enabled or pool < 0 or self.cap <= 0:
            return -1
        s.out = self.norm
        normalize_into(&s, q, n, False)  # the hash only: the text is written for a new row
        i = slot_hash(s.h, pool) & self.mask
        while True:
            idx = self.slots[i]
            if idx == -1:
                break
            e = &self.entries[idx]
            if e.fp == s.h and e.pool == pool:
                if self.head != idx:
                    self._unlink(idx)
                    self._push_front(idx)
                return ((<long long>e.gen) << 32) | idx
            i = (i + 1) & self.mask
        normalize_into(&s, q, n, True)
        text = <char *>malloc(s.len + 1)
        if text == NULL:
            return -1
        memcpy(text, s.out, s.len)
        if self.used >= self.cap:
            idx = self.tail  # the least recently used row makes room, in place
            self._evict(idx)
        else:
            idx = self.used
            self.used += 1
        e = &self.entries[idx]
        e.fp = s.h
        e.pool = pool
        e.gen = self.next_gen
        self.next_gen = (self.next_gen + 1) & 0x7FFFFFFF
        e.text = text
        e.text_len = s.len
        clear_counters(e)
        self._place(idx)
        self._push_front(idx)
        return ((<long long>e.gen) << 32) | idx

    cdef bint touch(self, long long handle) noexcept:
        """A handle still names its row (not evicted nor reset): it becomes the most recently used."""
        cdef int idx
        if handle < 0 or not self.enabled:
            return False
        idx = <int><unsigned int>handle
        if idx >= self.used or self.entries[idx].gen != <unsigned int>(handle >> 32):
            return False
        if self.head != idx:
            self._unlink(idx)
            self._push_front(idx)
        return True

    cdef void record(self, long long handle, int pool, long long us, long long rows, bint error,
                     long long wait_us) noexcept:
        cdef int idx
        cdef unsigned int gen
        cdef QEntry *e
        if handle < 0:
            return
        idx = <int><unsigned int>handle  # (the low 32 bits)
        gen = <unsigned int>(handle >> 32)
        if idx < self.used and self.entries[idx].gen == gen:
            e = &self.entries[idx]
        elif 0 <= pool < self.n_others:
            e = &self.others[pool]  # its row was evicted (or reset) while it ran
        else:
            return
        if us < 0:
            us = 0
        e.calls += 1
        if error:
            e.errors += 1
        e.rows += rows
        e.total_us += us
        e.wait_us += wait_us
        if us < e.min_us:
            e.min_us = us
        if us > e.max_us:
            e.max_us = us
        e.hist[bucket_of(us)] += 1

    # -------------------------------------------------------------- Python's side

    def lookup_text(self, int pool, data):
        """lookup() for Python's paths and tests: a handle, or -1 (statistics off)."""
        cdef const unsigned char[::1] view = data
        return self.lookup(pool, &view[0] if view.shape[0] else <const unsigned char *>b"", view.shape[0])

    def record_call(self, long long handle, int pool, long long us, long long rows=0, bint error=False,
                    long long wait_us=0):
        """record() for tests."""
        self.record(handle, pool, us, rows, error, wait_us)

    def __len__(self):
        return self.used

    @property
    def max_entries(self):
        return self.cap

    def export(self, bint hist=False):
        """Every row: (database, user, fingerprint, text, calls, errors, rows, total_us, wait_us,
        min_us, max_us, p50_us, p95_us, p99_us, histogram bytes or None). "Other" rows (text
        None, fingerprint 0) only once something was folded into them."""
        cdef int i
        cdef QEntry *e
        out = []
        for i in range(self.used):
            e = &self.entries[i]
            if e.calls:
                out.append(self._row(e, PyBytes_FromStringAndSize(e.text, e.text_len).decode("utf-8", "replace"),
                                     hist))
        for i in range(self.n_others):
            e = &self.others[i]
            if e.calls:
                out.append(self._row(e, None, hist))
        return out

    cdef tuple _row(self, QEntry *e, object text, bint hist):
        database, user = self.pools[e.pool]
        lo = e.min_us if e.calls else 0
        return (database, user, e.fp, text, e.calls, e.errors, e.rows, e.total_us, e.wait_us, lo, e.max_us,
                percentile(e.hist, e.calls, 0.50, lo, e.max_us), percentile(e.hist, e.calls, 0.95, lo, e.max_us),
                percentile(e.hist, e.calls, 0.99, lo, e.max_us),
                PyBytes_FromStringAndSize(<char *>e.hist, sizeof(e.hist)) if hist else None)

