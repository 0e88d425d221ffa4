# Per-query statistics: the table the engine adds to in C, one row per (pool, normalized statement).
#
# A statement is normalized as pg_stat_statements shows it: constants and parameters become $n,
# comments go, whitespace folds to one space, trailing semicolons go; keywords and unquoted
# identifiers are compared without case. `lookup()` normalizes and hashes a statement text in one
# pass and returns a handle (generation << 32 | index) for `record()` to add one call to once its
# ReadyForQuery arrives. The table is bounded: past `max_entries`, the least recently used row is
# folded into its pool's "other" row. Python reads it with `export()` (SHOW QUERIES, /metrics, the
# dashboard: pgmux/stats/queries.py).

cdef enum:
    QS_BUCKETS = 160      # latency histogram: 4 buckets per power of two of microseconds, to 2**40
    QS_TEXT_MAX = 1024    # normalized text kept per row (PostgreSQL's track_activity_query_size)

ctypedef struct QEntry:
    unsigned long long fp         # fingerprint of the normalized text (0: an "other" row)
    int pool                      # QueryStats.pool_id(database, user)
    int prev, next                # least-recently-used list (-1 ends it)
    unsigned int gen              # bumped whenever the slot holds a new statement
    long long calls, errors, rows, total_us, wait_us, min_us, max_us
    char *text
    int text_len
    unsigned int hist[QS_BUCKETS]

# The normalizer's reading of a number (digits [. digits] [e [+-] digits]), for the engine's
# same_shape(), which must agree with it.
cdef Py_ssize_t skip_number(const unsigned char *q, Py_ssize_t j, Py_ssize_t n) noexcept nogil


cdef class QueryStats:
    cdef QEntry *entries          # entries[0:used] are live, densely
    cdef int cap, used
    cdef int *slots               # open addressing (linear probing): entry index or -1
    cdef unsigned int mask
    cdef int head, tail           # most and least recently used entry
    cdef unsigned int next_gen
    cdef QEntry *others           # per pool id: what evicted rows and stale handles added up to
    cdef int n_others
    cdef unsigned char *norm      # the normalized text of a new row
    cdef list pools               # pool id -> (database, user)
    cdef dict pool_ids
    cdef public bint enabled
    cdef public long long evictions

    cdef void _free_texts(self) noexcept
    cdef void _rehash(self) noexcept
    cdef void _place(self, int idx) noexcept
    cdef void _unlink(self, int idx) noexcept
    cdef void _push_front(self, int idx) noexcept
    cdef void _unslot(self, int idx) noexcept
    cdef void _evict(self, int idx) noexcept
    cdef void _move(self, int src, int dst) noexcept
    cdef tuple _row(self, QEntry *e, object text, bint hist)
    cdef long long lookup(self, int pool, const unsigned char *q, Py_ssize_t n) noexcept
    cdef bint touch(self, long long handle) noexcept
    cdef void record(self, long long handle, int pool, long long us, long long rows, bint error,
                     long long wait_us) noexcept
