# The seam between pgmux's compiled data path and its Python control plane.
#
# Engine owns an epoll set whose fd is registered once in the asyncio loop (add_reader): the loop
# enters Python once per batch of ready sockets, and `run()` reads, walks message headers, counts
# requests and writes in C. A Link is one socket the engine owns (a logged-in client, or a server
# connection after its login); pgmux's ClientConnection and ServerConnection subclass it, so the
# link state below is one set of fields that C and Python both read.
#
# Each Link is in one of two modes, chosen per link (as uvloop picks its typed or generic path):
#   slow   the engine is the link's transport: every read goes to the Python protocol
#          (get_buffer / buffer_updated, as asyncio's BufferedProtocol), every write from Python
#          goes through the engine's output queue. Login leftovers, pgmux's own queries (reset,
#          parameter sync, pinning probe), unlinked clients and tracked links run here.
#   fast   a linked client/server pair: framing both directions, request counting against
#          ReadyForQuery, COPY states, statistics and back-pressure in C, no Python per message.
#          Python is entered only for what needs it (see the `on_*` hooks of the subclasses):
#            client -> Python  `engine_escape(data)`: a message the fast path does not decide
#                               (Terminate, an unknown type, a named Parse that starts tracking, a
#                               query whose first keyword may create session state or that names a
#                               database, a Close of a pgmux statement): the link turns slow at
#                               that message boundary and Python gets the bytes from it onward.
#            server -> Python  `engine_parameter_status(body)`, `engine_command_complete(tag)` (a
#                               tag that forgets prepared statements), `engine_transaction_end()`
#                               (a ReadyForQuery with nothing outstanding, on a message boundary,
#                               in transaction and statement mode).
#          Python -> engine    `link_fast(client, server)`, `unlink(link)` (back to slow, carried
#                               bytes handed over), `adopt(link, transport)`.
#
# Under uvloop the engine may hold the loop (`enable_hold`): after a batch, while the loop has
# nothing pending (no ready callback, handle to close or start, queued stream write, due timer:
# libuv's uv_backend_timeout and check handles, read through uvloop's exported libuv), run() waits
# in the engine's own epoll_wait, libuv's epoll fd added to the engine's set, instead of returning:
# one epoll_wait per wake-up instead of two. Any event on libuv's fd, a timer, a signal or pending
# work from a hook ends the hold.

from cpython.ref cimport PyObject

from pgmux.engine._querystats cimport QueryStats
from pgmux.engine._ossl cimport NativeTls


# Link.engine_login: a client whose login the engine reads in C (Engine._login_read)
cdef enum CLogin:
    CL_NONE = 0       # not (Python's login, or logged in)
    CL_STARTUP = 1    # waiting for the StartupMessage (SSL/GSS requests answered N)
    CL_MD5 = 2        # the md5 challenge sent: waiting for the PasswordMessage
    CL_SASL_FIRST = 3 # AuthenticationSASL sent: waiting for the SASLInitialResponse
    CL_SASL_FINAL = 4 # the server-first-message sent: waiting for the SASLResponse


cdef enum LinkMode:
    MODE_SLOW = 0
    MODE_FAST = 1

cdef enum LinkKind:
    KIND_CLIENT = 1
    KIND_SERVER = 2

# client flags, set by Python when a link turns fast
cdef enum ClientFlag:
    CF_PIN_HINTS = 1       # pin_session_state != off: queries whose first keyword may create state escape
    CF_LAZY_PREPARE = 2    # a named Parse may start prepared-statement tracking: it escapes
    CF_SESSION = 4         # session pooling: no transaction-end callback
    CF_TRACKED = 8         # prepared statements tracked: names rewritten, requests recorded (ring)

cdef enum:
    QRING = 16             # requests in flight whose per-query statistics a server link keeps

# Per-query statistics of a server link (malloc'd at its first statement): the request being
# built (Parse/Bind/Query seen, Sync not yet), then one entry per request in flight, in the order
# their ReadyForQuery will come, kept aligned with `outstanding`.
cdef enum:
    NO_SHAPE = -2          # Engine._shape_find: the text has no known shape
    QTEXT_KEEP = 240       # a client's last statement text kept for same_shape(), at most
    SHAPE_SLOTS = 1024     # the engine's shape table (Engine.shapes): statement texts by shape_slot(),
    SHAPE_WAYS = 4         # ... in sets of SHAPE_WAYS
    SHAPE_PREFIX = 128     # shape_slot() hashes at most this many bytes
    SHAPE_TEXT_MAX = 4096  # longer statement texts are not kept there

# What the client walk's keyword tests (names_database, maybe_session_state) said of a text:
# the same for every text of its shape (numbers hold no `;`, letter or keyword), so a Query
# whose shape is known skips both scans.
cdef enum Verdict:
    V_KNOWN = 1            # the tests ran on this text (else: not yet, e.g. stored from a Parse)
    V_DATABASE = 2         # names_database()
    V_STATE = 4            # maybe_session_state()

# A client's last statement text and its QueryStats handle: the next one that differs only in
# the values of its numbers is the same statement, found without normalizing it again.
ctypedef struct QLast:
    int len
    int pool
    long long handle
    unsigned char verdict  # Verdict bits
    unsigned char text[QTEXT_KEEP]

# A statement text in the engine's shape table, and its QueryStats handle.
ctypedef struct Shape:
    int len
    int cap
    int pool
    unsigned char verdict  # Verdict bits
    long long handle
    unsigned char *text

ctypedef struct QLink:
    long long pending          # QueryStats handle of the request being built, -1: none
    long long statement        # ... of the latest Parse or Bind (an Execute makes it `pending`)
    long long rows             # rows of the CommandCompletes of the request at the front
    long long wait_us          # the linked client's wait for this server, for its next statement
    bint error                 # an ErrorResponse answered the request at the front
    int head, len
    long long handles[QRING]
    double started[QRING]


cdef class PoolStats:
    cdef public long long xact_count, query_count, server_assignment_count
    cdef public long long bytes_received, bytes_sent
    cdef public long long xact_time_us, query_time_us, wait_time_us
    cdef public long long client_login_count, client_parse_count, server_parse_count, bind_count
    cdef public bint histograms
    cdef public object wait_hist, query_hist, xact_hist


cdef class PoolCore:
    # The C side of one pgmux.pool.Pool: what the engine needs to link and release on its own.
    # idle/active/waiting are the Pool's own containers (the engine calls their methods, no
    # Python code runs); `enabled` is cleared by Python whenever a release must go through it
    # (shutdown, server_reset_query_always).
    cdef public object pool, idle, active, waiting
    cdef public PoolStats stats
    cdef public bint enabled
    cdef public double lifetime       # server_lifetime, 0 = none
    cdef public double check_delay    # server_check_delay when server_check_query is set, else -1
    cdef public int pool_size         # the pool's size: below it, a queued client asks for a new server
    cdef public bint reserve          # reserve_pool_size is set: always ask (Pooler.launch_connects decides)
    cdef public int qpool             # QueryStats.pool_id of the pool, -1: no per-query statistics
    cdef public bint paused           # Pool.paused (Pool.set_paused keeps both)
    cdef public bint round_robin      # server_round_robin: the idle list is a FIFO
    cdef public bint login_failing    # Pool.login_failure is set (Pool.set_login_failure keeps both)
    cdef object idle_append, idle_pop, idle_popleft, waiting_popleft, waiting_appendleft, active_add, active_discard


cdef class Engine


cdef class TlsState:
    cdef public object sslobj, incoming, outgoing, waiter
    cdef public bint live
    cdef NativeTls nat                # once live: OpenSSL called from C (_ossl.pyx); nat.ssl NULL: Python's ssl


cdef class Link:
    # ---- I/O, owned by the engine once adopted
    cdef Engine eng
    cdef int fd
    cdef unsigned int gen
    cdef unsigned int registered      # epoll mask in force
    cdef unsigned char kind
    cdef unsigned char mode
    cdef unsigned char flags          # ClientFlag
    cdef public unsigned char engine_login  # CLogin: the engine reads this client's login in C
    cdef bint reading_paused          # Python asked (transport.pause_reading)
    cdef bint held                    # a client the engine queued: its bytes are in rbuf (more are added)
    cdef bint held_full               # ... HOLD_LIMIT of them: not read until linked
    cdef bint closing                 # close once the output queue drained
    cdef bint write_paused_sent       # protocol.pause_writing() was called
    cdef bint lost                    # socket closed; connection_lost scheduled
    cdef public bint linger           # close gracefully: FIN, then read and drop until the peer closes
    cdef bint lingering               # a ghost doing so for a closed link (Engine._end_link)
    cdef object login_secret          # CL_MD5: md5(password + user) in hex, then the 4-byte salt sent (bytes);
                                      # CL_SASL_*: the exchange (_login.ScramLogin)
    cdef unsigned char *rbuf          # bytes kept between reads (fast mode), malloc'd on demand
    cdef Py_ssize_t rcap, rkeep
    cdef long long rskip              # body bytes of the current message still to come
    cdef unsigned char *obuf          # output queue: what send() could not take
    cdef Py_ssize_t ocap, ohead, otail
    cdef unsigned char *ring          # tracked fast link (server): kinds of the requests in flight
    cdef int ring_cap, ring_head, ring_len
    cdef bint tracked_fast
    cdef Link peer                    # fast mode: the other side of the link
    cdef object tls                   # TlsState: a TLS link (ssl.SSLObject over MemoryBIOs), else None
    cdef QLink *q                     # server: per-query statistics of the requests in flight
    cdef QLast *qlast                 # client: its last statement text (malloc'd at its first)
    cdef long long q_unnamed          # client: QueryStats handle of its unnamed statement's text
    cdef public object query_names    # client: {statement name: QueryStats handle}, made on demand
    cdef bytes bind_name              # client: the statement name of its last named Bind, reused while it repeats
    cdef long long lru_last_id        # server: the statement its last native Bind moved to the end of its LRU...
    # ---- link state (server side), read and written by Python too
    cdef public int outstanding       # Query/Sync/FunctionCall not yet answered by ReadyForQuery
    cdef public bint pending_ext      # extended-protocol messages since the last Sync
    cdef public int status            # transaction status of the last ReadyForQuery
    cdef public int last_start        # kind of the latest request (COPY IN accounting)
    cdef public int copy_in, copy_base
    cdef public bint boundary_due     # the transaction ended but a read cut a message after it
    cdef int lru_last_size            # ... (lru_last_id) and the LRU's size then (changed since: move it again)
    cdef public double query_start, xact_start, last_used, request_time
    cdef public PoolStats link_stats  # the pool's counters (servers)
    cdef public long long max_packet_size  # longest message accepted from this peer
    # ---- what pooling decisions read, in C for the engine's own link and release
    cdef public bint closed           # the socket closed (or is closing): the pool forgets it
    cdef public bint waiting          # client: in its pool's queue
    cdef public bint linking          # client: a slow-path step of its link is running
    cdef public bint write_paused, read_paused
    cdef public bint auto             # client: the engine may link and release it by itself
    cdef public bint close_needed, dirty  # server: close, or reset, before anyone else gets it
    cdef public int cancels           # server: cancel requests not yet delivered
    cdef public double connect_time, wait_started
    cdef public PoolCore core
    # ---- the rest of what both paths read on every link and release (plain attributes for Python)
    cdef public Py_ssize_t keep       # slow path: bytes kept at the front of the protocol's buf
    cdef public long long skip        # slow path: body bytes of the current message still to come
    cdef public Py_ssize_t sent_prefix  # server, tracked slow path: kept bytes already forwarded
    cdef public bint forwarding       # on the data path (False: bytes go to `inbox`)
    cdef public bint tracking         # prepared statements tracked on this link
    cdef public bint statement_mode   # server: statement pooling (answers read whole)
    cdef public Link server           # client: the linked server
    cdef public Link client           # server: the linked client
    cdef public object params         # ParamSet: tracked parameters
    cdef public object state          # server: "login", "idle", "active", "used", ...
    cdef public object stmts          # client: its named statements; server: ServerStatements
    cdef public object tracker        # server: ResponseTracker
    cdef public object inbox          # bytearray read by read_message() off the data path

    cdef int _queue(self, const unsigned char *p, Py_ssize_t n) except -1
    cdef int send_bytes(self, const unsigned char *p, Py_ssize_t n) except -1
    cdef int _send_raw(self, const unsigned char *p, Py_ssize_t n) except -1
    cdef int _keep_bytes(self, const unsigned char *p, Py_ssize_t n) except -1
    cdef int ring_push(self, unsigned char kind) except -1
    cdef int ring_front(self) noexcept
    cdef void ring_pop(self) noexcept
    cdef void ring_drop_syncs(self) noexcept
    cdef bytes ring_take(self)
    cdef void note_request(self, int kind, double now)
    cdef void ready_for_query(self, int status, double now)
    cdef void copy_started(self)
    cdef void copy_end(self)
    cdef QLink *qlink(self) noexcept
    cdef QLink *qlink_for(self, long long handle) noexcept
    cdef void q_pending(self, long long handle) noexcept
    cdef void q_statement(self, long long handle) noexcept
    cdef int parse_noted(self, Link server, int pool, const unsigned char *name, Py_ssize_t tl,
                         const unsigned char *text, Py_ssize_t nl) except -1
    cdef int name_query(self, const unsigned char *name, Py_ssize_t n, long long handle) except -1
    cdef int _c_login_over(self) except -1
    cdef bytes statement_name(self, const unsigned char *name, Py_ssize_t n)
    cdef long long bind_query(self, const unsigned char *body, Py_ssize_t blen) except? -2


cdef class Statement:
    cdef readonly object id           # a Python int: the key of ServerStatements.lru
    cdef readonly bytes server_name   # PGMUX_<id>
    cdef readonly bytes tail          # the Parse body after the statement name: query\0 int16 n, n x oid


cdef enum:
    MAX_ACCEPT_OPTIONS = 24           # (level, option, value) triples: 8 socket options


cdef class Acceptor(Link):
    cdef object on_accept             # on_accept(fd, peer, local): a connection accepted
    cdef object on_error              # on_error(errno): accept failed (descriptors, memory)
    cdef int nopts
    cdef int opts[MAX_ACCEPT_OPTIONS]


ctypedef void (*uv_loop_fn)(void *loop) noexcept nogil
ctypedef int (*uv_loop_int_fn)(void *loop) noexcept nogil
ctypedef int (*uv_handle_int_fn)(void *handle) noexcept nogil

cdef enum:
    UV_CHECKS_MAX = 8


cdef class Engine:
    cdef public int epfd
    # Holding the loop (uvloop only, enable_hold): while its sockets keep it busy and the loop has
    # nothing pending, the engine waits in its own epoll_wait, which then also watches libuv's fd.
    cdef void *uvl                    # the uvloop Loop's uv_loop_t
    cdef int uvfd                     # its epoll fd (uv_backend_fd)
    cdef uv_loop_fn uv_update_time
    cdef uv_loop_int_fn uv_backend_timeout
    cdef uv_handle_int_fn uv_is_active
    cdef void *uv_checks[UV_CHECKS_MAX]  # the loop's check handles (uvloop's queued writes run in one)
    cdef int n_checks
    cdef public bint hold             # enable_hold() succeeded
    cdef bint stopped                 # close() was called
    cdef public unsigned long long holds, hold_batches
    cdef int quiet                    # batches in a row after which the loop had nothing pending
    cdef int quiet_need               # ... needed before the next hold (doubles when holds end at once)
    cdef int spare_fd                 # /dev/null, closed for a moment when accept hits EMFILE
    cdef object loop
    cdef PyObject **table             # fd -> Link (strong references)
    cdef int table_size
    cdef unsigned int next_gen
    cdef double now
    cdef public unsigned long long batches, reads, fast_reads, escapes
    cdef public unsigned long long tls_native, tls_python  # TLS handshakes done: records then in C / through ssl
    cdef public unsigned long long c_logins, login_escapes  # md5 answers checked in C / logins handed to Python
    # StartupMessage bodies (protocol 3.0, after the length and version words) -> what Python's login
    # made of an earlier byte-identical one (net.client.LoginRoute): such a packet is not parsed
    # again (Link.engine_route_startup). Python fills and clears it (a RELOAD clears it).
    cdef public dict login_routes
    cdef public unsigned long long route_logins  # logins whose StartupMessage found a route
    cdef public unsigned long long c_scram_logins  # SCRAM exchanges the engine ran to the end
    cdef unsigned char *shared        # read buffer of every link that keeps nothing between reads
    cdef unsigned char *tlsplain      # plaintext of a TLS read (shared then holds the raw bytes)
    cdef unsigned char *tlsout        # records a native TLS link sends, on their way to _send_raw
    cdef public bint native_tls       # hand TLS links to C after their handshake (False: Python's ssl only)
    cdef public bint offer_tls        # client TLS is on: an SSLRequest goes to Python's login
    cdef bint in_run                  # inside run(): Python hooks wait for the walk in progress
    cdef unsigned char *scratch       # a tracked client's output with names rewritten, sent at once
    cdef Py_ssize_t scratch_cap, scratch_len
    cdef list paused_now              # links whose pause_writing() is due once the walk is over
    cdef public QueryStats qstats     # per-query statistics (query_stats, SHOW QUERIES)
    cdef Shape *shapes                # SHAPE_SLOTS statement texts and their handles (_statement_handle)
    cdef unsigned int shape_turn      # which way of a full set the next new text replaces

    cdef int _register(self, Link link) except -1
    cdef int _accept(self, Acceptor a) except -1
    cdef int _run_batch(self, void *events, int n) except -1
    cdef int _batch(self, void *events, int n) except -1
    cdef bint _loop_pending(self, int *timeout) noexcept
    cdef int _hold(self) except -1
    cdef void _rejoin_libuv(self) noexcept
    cdef int _pause_writers(self) except -1
    cdef void _update_events(self, Link link)
    cdef int _flush(self, Link link) except -1
    cdef int _close_link(self, Link link, object exc) except -1
    cdef int _end_link(self, Link link) except -1
    cdef int _read_lingering(self, Link link) except -1
    cdef int _on_readable(self, Link link) except -1
    cdef int _login_read(self, Link link) except -1
    cdef int _scram_step(self, Link link, const unsigned char *body, Py_ssize_t n) except -1
    cdef ssize_t _recv(self, Link link, unsigned char *buf, Py_ssize_t cap) except -2
    cdef ssize_t _recv_raw(self, Link link, unsigned char *buf, Py_ssize_t cap) except -2
    cdef ssize_t _recv_tls(self, Link link, unsigned char *buf, Py_ssize_t cap) except -2
    cdef ssize_t _tls_read(self, Link link, unsigned char *buf, Py_ssize_t cap) except -2
    cdef ssize_t _native_read(self, Link link, TlsState st, unsigned char *buf, Py_ssize_t cap) except -2
    cdef int _native_flush(self, Link link, TlsState st) except -1
    cdef int _tls_step(self, Link link) except -1
    cdef int _tls_flush(self, Link link) except -1
    cdef int _tls_failed(self, Link link, str why) except -1
    cdef int _read_slow(self, Link link) except -1
    cdef int _read_fast(self, Link link) except -1
    cdef int _client_walk(self, Link c, Link s, unsigned char *b, Py_ssize_t end) except -1
    cdef Py_ssize_t _statement_ref(self, Link c, Link s, unsigned char *b, Py_ssize_t pos, unsigned int ln,
                                   unsigned char typ, object stmts, object lru, Py_ssize_t run) except -2
    cdef int _scratch_add(self, const unsigned char *p, Py_ssize_t n) except -1
    cdef void _shape_store(self, Shape *set_, const unsigned char *q, Py_ssize_t n, int pool, long long h,
                           unsigned char verdict) noexcept
    cdef void _remember_last(self, Link c, const unsigned char *q, Py_ssize_t n, int pool, long long h,
                             unsigned char verdict) noexcept
    cdef long long _shape_find(self, Link c, int pool, const unsigned char *q, Py_ssize_t n,
                               unsigned char **verdict) noexcept
    cdef long long _statement_handle(self, Link c, int pool, const unsigned char *q, Py_ssize_t n,
                                     unsigned char verdict=*) noexcept
    cdef int _server_walk(self, Link s, Link c, unsigned char *b, Py_ssize_t keep, Py_ssize_t end) except -1
    cdef int _end_of_transaction(self, Link s) except -1
    cdef bint _release(self, Link s, Link c) except -1
    cdef bint _can_link(self, Link c, Link s) except -1
    cdef int _link(self, Link c, Link s) except -1
    cdef int _join(self, Link c, Link s) except -1
    cdef bint _auto_link_read(self, Link c) except -1
    cdef int _deliver_slow(self, Link link, unsigned char *p, Py_ssize_t n) except -1
    cdef int _read_held(self, Link c) except -1
    cdef int _unhold(self, Link link) except -1
    cdef int _enqueue(self, Link c, unsigned char *b, Py_ssize_t n) except -1
    cdef int _to_slow(self, Link link) except -1
    cdef int _to_fast(self, Link link) except -1
