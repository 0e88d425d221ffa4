"""The workloads of issue 8, in the order they run within each repetition."""

from __future__ import annotations

from dataclasses import dataclass, field

TARGETS = ("direct", "pgbouncer", "pgmux", "pgmux2")
TARGET_LABEL = {"direct": "direct", "pgbouncer": "PgBouncer", "pgmux": "pgmux", "pgmux2": "pgmux ×2"}
POOLERS = ("pgbouncer", "pgmux", "pgmux2")
PGMUX_TARGETS = ("pgmux", "pgmux2")  # pgmux2: the same ini plus ``workers = 2`` (a supervisor and 2 workers)
POOLER_KIND = {"pgbouncer": "pgbouncer", "pgmux": "pgmux", "pgmux2": "pgmux"}
POOLER_EXTRA: dict[str, dict[str, object]] = {"pgmux2": {"workers": 2}}  # settings on top of the shared ini


@dataclass(frozen=True)
class Workload:
    key: str  # --only name
    label: str  # as shown in tables and the chart
    args: tuple[str, ...] = ()  # pgbench arguments (without -n -T -l, the connection string)
    clients: int = 50
    user: str = "md5user"
    targets: tuple[str, ...] = TARGETS
    script: str | None = None  # custom pgbench script text (file written into the temp dir)
    kind: str = "pgbench"  # or "idle", "burst" (run by bench.run itself, not pgbench)
    tls: bool = False  # PGSSLMODE=require, against the TLS instances of the poolers (client_tls_sslmode=require)
    note: str = ""
    gate: dict[str, float] = field(default_factory=dict, hash=False, compare=False)  # issue 8 goals
    console: tuple[str, ...] = ()  # console commands before the run (pgmux targets), ...
    console_after: tuple[str, ...] = ()  # ... and after it


def pgbench_workloads() -> list[Workload]:
    def S(c: int) -> tuple[str, ...]:
        return ("-S", "-c", str(c), "-j", str(min(2, c)))

    return [
        Workload("select-c1", "-S, 1 client", S(1), clients=1),
        Workload("select-c50", "-S, 50 clients", S(50), gate={"tps": 1.0, "cpu": 1.0}),
        Workload(
            "select-c50-nostats",
            "-S, 50 clients, query_stats off",
            S(50),
            targets=("pgmux",),
            console=("SET query_stats = 0",),
            console_after=("SET query_stats = 1",),
            note="the same pgmux process with per-query statistics turned off (SET on its console)",
        ),
        Workload("select-c500", "-S, 500 clients", S(500), clients=500, gate={"tps": 1.0, "cpu": 1.0}),
        Workload(
            "select-tls",
            "-S TLS, 50 clients",
            S(50),
            tls=True,
            note="PGSSLMODE=require; poolers: their own instances with client_tls_sslmode=require",
        ),
        Workload("extended", "-S -M extended, 50 clients", (*S(50), "-M", "extended")),
        Workload(
            "prepared",
            "-S -M prepared, 50 clients",
            (*S(50), "-M", "prepared"),
            targets=("direct", "pgmux", "pgmux2"),
            note="PgBouncer 1.18 has no protocol-level prepared statements in transaction mode (1.21+ has)",
        ),
        Workload("tpcb", "TPC-B-like, 50 clients", ("-c", "50", "-j", "2")),
        Workload("connect-md5", "-C -S md5, 8 clients", ("-C", *S(8)), clients=8, gate={"tps": 1.0}),
        Workload(
            "connect-tls",
            "-C -S TLS md5, 8 clients",
            ("-C", *S(8)),
            clients=8,
            tls=True,
            note="PGSSLMODE=require, a TLS handshake per connection; poolers: their TLS instances (as select-tls)",
        ),
        Workload(
            "connect-scram",
            "-C -S SCRAM, 8 clients",
            ("-C", *S(8)),
            clients=8,
            user="scramuser",
            gate={"tps": 1.0},
        ),
        Workload(
            "rows-1k",
            "1,000-row result, 8 clients",
            ("-c", "8", "-j", "2"),
            clients=8,
            script="SELECT * FROM generate_series(1, 1000);\n",
            gate={"tps": 1.0},
        ),
        Workload(
            "rows-100k",
            "100,000-row result, 8 clients",
            ("-c", "8", "-j", "2"),
            clients=8,
            script="SELECT * FROM generate_series(1, 100000);\n",
        ),
    ]


# a fresh pooler per repetition; single-process pgmux only (a second worker would log in its own pool)
IDLE = Workload("idle", "idle clients", kind="idle", targets=("pgbouncer", "pgmux"))


# a fresh pooler per repetition, like IDLE; pgmux ×2 too (logins spread over its two workers)
BURST = Workload(
    "login-burst",
    "login burst",
    kind="burst",
    targets=("pgbouncer", "pgmux", "pgmux2"),
    note="--burst-clients raw md5 logins at once, --burst-in-flight in flight, all held until the last is in",
)


def all_workloads() -> list[Workload]:
    return [*pgbench_workloads(), IDLE, BURST]
