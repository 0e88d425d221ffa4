"""Summaries, the Markdown report and the PNG chart.

Every pooler figure is shown next to its ratio pgmux/PgBouncer (and pgmux ×2/PgBouncer: pgmux with
``workers = 2``). Ratios are computed per repetition (the runs of a repetition ran back to back, so they
shared the machine's conditions) and the median of those ratios is reported; absolute figures are medians
over repetitions.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .measure import RunResult
from .workloads import PGMUX_TARGETS, POOLERS, TARGET_LABEL, TARGETS, Workload

METRICS = ("tps", "mean_ms", "p99_ms", "cpu_us")


@dataclass
class Cell:
    """Median of one metric over the successful repetitions of one (workload, target)."""

    runs: list[RunResult] = field(default_factory=list)

    @property
    def ok_runs(self) -> list[RunResult]:
        return [r for r in self.runs if r.ok]

    @property
    def errors(self) -> list[str]:
        return [r.error for r in self.runs if r.error]

    def median(self, metric: str) -> float | None:
        vals = [getattr(r, metric) for r in self.ok_runs if getattr(r, metric) is not None]
        return statistics.median(vals) if vals else None

    def span(self, metric: str) -> tuple[float, float] | None:
        vals = [getattr(r, metric) for r in self.ok_runs if getattr(r, metric) is not None]
        return (min(vals), max(vals)) if vals else None

    def extra_median(self, key: str) -> float | None:
        vals = [float(v) for r in self.ok_runs if isinstance(v := r.extra.get(key), int | float)]
        return statistics.median(vals) if vals else None


class Summary:
    """All results, indexed by workload and target; ``targets``: the columns (default: those with results)."""

    def __init__(
        self, workloads: Sequence[Workload], results: Iterable[RunResult], targets: Iterable[str] | None = None
    ) -> None:
        self.workloads = list(workloads)
        self.results = list(results)
        self.cells: dict[tuple[str, str], Cell] = {}
        for r in self.results:
            self.cells.setdefault((r.workload, r.target), Cell()).runs.append(r)
        wanted = set(targets) if targets is not None else {r.target for r in self.results}
        self.targets = [t for t in TARGETS if t in wanted]

    @property
    def pgmuxes(self) -> list[str]:
        """The pgmux targets of this run (pgmux, pgmux2), in column order."""
        return [t for t in PGMUX_TARGETS if t in self.targets]

    @property
    def poolers(self) -> list[str]:
        return [t for t in POOLERS if t in self.targets]

    def cell(self, workload: str, target: str) -> Cell | None:
        return self.cells.get((workload, target))

    def ratio(self, workload: str, metric: str, num: str = "pgmux", den: str = "pgbouncer",
              den_workload: str | None = None) -> float | None:
        """Median over repetitions of num/den for ``metric``, pairing runs of the same repetition
        (``den_workload``: the denominator comes from another workload, same target)."""
        a, b = self.cell(workload, num), self.cell(den_workload or workload, den)
        if a is None or b is None:
            return None
        by_rep = {r.rep: r for r in b.ok_runs}
        ratios = []
        for r in a.ok_runs:
            other = by_rep.get(r.rep)
            x = getattr(r, metric) if metric in METRICS else r.extra.get(metric)
            y = (getattr(other, metric) if metric in METRICS else other.extra.get(metric)) if other else None
            if isinstance(x, int | float) and isinstance(y, int | float) and y:
                ratios.append(x / y)
        return statistics.median(ratios) if ratios else None

    def ran(self, workload: Workload) -> bool:
        return any((workload.key, t) in self.cells for t in workload.targets)


# --------------------------------------------------------------------------------------------------
# formatting


def f_num(v: object, digits: int = 0) -> str:
    """A number with thousands separators (`digits` decimals below 1,000); anything else: a dash."""
    if not isinstance(v, int | float) or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if digits == 0 or abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def f_ms(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 10 else f"{v:,.1f}"


def f_ratio(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}x"


def fails(cell: Cell | None) -> str | None:
    """'fails: <error>' if every run of the cell failed, else None."""
    if cell is None or cell.ok_runs or not cell.errors:
        return None
    return "fails: " + cell.errors[0].replace("|", "\\|")


def partial_note(cell: Cell | None) -> str:
    if cell is None or not cell.errors or not cell.ok_runs:
        return ""
    return f" ({len(cell.errors)} of {len(cell.runs)} failed)"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# tables


def pgbench_ran(s: Summary) -> list[Workload]:
    """The pgbench workloads that have results."""
    return [w for w in s.workloads if w.kind == "pgbench" and s.ran(w)]


def ratio_name(num: str, den: str = "pgbouncer") -> str:
    """'pgmux/PgBouncer', 'pgmux ×2/PgBouncer', ..."""
    return f"{TARGET_LABEL[num]}/{TARGET_LABEL[den]}"


def bold_ratio(v: float | None) -> str:
    return "–" if v is None else f"**{f_ratio(v)}**"


def target_cells(
    s: Summary,
    w: Workload,
    fmt: Callable[[Cell], str],
    failed: str | None = None,
    targets: Sequence[str] | None = None,
) -> list[str]:
    """One column per target of the run (direct, PgBouncer, pgmux, pgmux ×2): n/a¹ or – where ``w`` does not
    run, – without results, ``failed`` (default: the error) where every run failed, else ``fmt(cell)``."""
    out = []
    for t in s.targets if targets is None else targets:
        c = s.cell(w.key, t)
        if t not in w.targets:
            out.append("n/a¹" if t == "pgbouncer" else "–")
        elif c is None:
            out.append("–")
        elif fails(c):
            out.append(failed or fails(c) or "")
        else:
            out.append(fmt(c))
    return out


def throughput_table(s: Summary) -> str:
    """TPS of every target, pooler CPU per transaction, and each pgmux's ratios to PgBouncer (and pgmux/direct)."""
    vs_pgb = s.pgmuxes if "pgbouncer" in s.targets else []
    vs_direct = ["pgmux"] if "direct" in s.targets and "pgmux" in s.targets else []
    headers = [
        "workload",
        *(f"{TARGET_LABEL[t]} TPS" for t in s.targets),
        *(f"**{ratio_name(t)} TPS**" for t in vs_pgb),
        *(f"{ratio_name(t, 'direct')} TPS" for t in vs_direct),
        *(f"{TARGET_LABEL[t]} CPU µs/txn" for t in s.poolers),
        *(f"**{ratio_name(t)} CPU**" for t in vs_pgb),
    ]
    rows = []
    for w in pgbench_ran(s):
        row = [w.label, *target_cells(s, w, lambda c: f_num(c.median("tps")) + partial_note(c))]
        row += [bold_ratio(s.ratio(w.key, "tps", num=t)) for t in vs_pgb]
        row += [f_ratio(s.ratio(w.key, "tps", num=t, den="direct")) for t in vs_direct]
        for t in s.poolers:
            c = s.cell(w.key, t)
            row.append("–" if c is None or fails(c) else f_num(c.median("cpu_us"), 1))
        row += [bold_ratio(s.ratio(w.key, "cpu_us", num=t)) for t in vs_pgb]
        rows.append(row)
    return md_table(headers, rows)


def latency_table(s: Summary) -> str:
    vs_pgb = s.pgmuxes if "pgbouncer" in s.targets else []
    headers = [
        "workload",
        *(f"{TARGET_LABEL[t]} mean / p99 ms" for t in s.targets),
        *(f"{ratio_name(t)} {m}" for t in vs_pgb for m in ("mean", "p99")),
    ]
    rows = []
    for w in pgbench_ran(s):
        row = [w.label, *target_cells(s, w, lambda c: f"{f_ms(c.median('mean_ms'))} / {f_ms(c.median('p99_ms'))}",
                                      failed="fails")]
        row += [f_ratio(s.ratio(w.key, m, num=t)) for t in vs_pgb for m in ("mean_ms", "p99_ms")]
        rows.append(row)
    return md_table(headers, rows)


def idle_table(s: Summary) -> str:
    headers = [
        "pooler",
        "clients held",
        "RSS before MiB",
        "RSS holding MiB",
        "**KiB per idle client**",
        "CPU µs per login",
    ]
    rows = []
    for t in ("pgbouncer", "pgmux"):
        c = s.cell("idle", t)
        if c is None:
            continue
        if fails(c):
            rows.append([TARGET_LABEL[t], fails(c) or "", "", "", "", ""])
            continue
        before, after = c.extra_median("rss_before_kb"), c.extra_median("rss_held_kb")
        rows.append(
            [
                TARGET_LABEL[t],
                f_num(c.extra_median("held")) + partial_note(c),
                f_num(before / 1024 if before else None, 1),
                f_num(after / 1024 if after else None, 1),
                f"**{f_num(c.extra_median('kib_per_client'), 2)}**",
                f_num(c.extra_median("cpu_us_per_login"), 1),
            ]
        )
    if len(rows) == 2:
        rows.append(
            [
                "**pgmux/PgBouncer**",
                "",
                f_ratio(s.ratio("idle", "rss_before_kb")),
                f_ratio(s.ratio("idle", "rss_held_kb")),
                f"**{f_ratio(s.ratio('idle', 'kib_per_client'))}**",
                f_ratio(s.ratio("idle", "cpu_us_per_login")),
            ]
        )
    return md_table(headers, rows)


BURST_KEY = "login-burst"


def burst_table(s: Summary) -> str:
    """The login burst per pooler: refusals (count, first error), burst time, login time percentiles, pooler
    CPU; then one row per pgmux target with its ratios to PgBouncer (p99 login time and CPU in bold)."""
    headers = [
        "pooler",
        "logged in",
        "refused / failed",
        "burst s",
        "login p50 ms",
        "p95 ms",
        "**p99 ms**",
        "max ms",
        "**pooler CPU s**",
        "CPU µs per login",
    ]
    rows = []
    for t in s.poolers:
        c = s.cell(BURST_KEY, t)
        if c is None:
            continue
        if fails(c):
            rows.append([TARGET_LABEL[t], fails(c) or "", *[""] * (len(headers) - 2)])
            continue
        ok = c.ok_runs
        failed = max(int(r.extra.get("failed", 0)) for r in ok)  # type: ignore[call-overload]
        first = next((str(r.extra.get("first_error")) for r in ok if r.extra.get("first_error")), "")
        refused = "0" if not failed else f"{failed:,}: {first}".replace("|", "\\|")
        rows.append(
            [
                TARGET_LABEL[t],
                f"{f_num(c.extra_median('logged_in'))} of {f_num(c.extra_median('clients'))}" + partial_note(c),
                refused,
                f_num(c.extra_median("burst_s"), 2),
                f_ms(c.extra_median("p50_ms")),
                f_ms(c.extra_median("p95_ms")),
                f"**{f_ms(c.extra_median('p99_ms'))}**",
                f_ms(c.extra_median("max_ms")),
                f"**{f_num(c.extra_median('cpu_s'), 2)}**",
                f_num(c.extra_median("cpu_us_per_login"), 1),
            ]
        )
    if "pgbouncer" in s.targets:
        for t in s.pgmuxes:
            if s.cell(BURST_KEY, t) is None or s.ratio(BURST_KEY, "cpu_s", num=t) is None:
                continue
            rows.append(
                [
                    f"**{ratio_name(t)}**",
                    "",
                    "",
                    f_ratio(s.ratio(BURST_KEY, "burst_s", num=t)),
                    f_ratio(s.ratio(BURST_KEY, "p50_ms", num=t)),
                    f_ratio(s.ratio(BURST_KEY, "p95_ms", num=t)),
                    bold_ratio(s.ratio(BURST_KEY, "p99_ms", num=t)),
                    f_ratio(s.ratio(BURST_KEY, "max_ms", num=t)),
                    bold_ratio(s.ratio(BURST_KEY, "cpu_s", num=t)),
                    f_ratio(s.ratio(BURST_KEY, "cpu_us_per_login", num=t)),
                ]
            )
    return md_table(headers, rows)


PREPARED_GOAL = 1.4  # issue "The engine": -M prepared TPS ≥ 1.4x -M extended TPS through pgmux


def prepared_table(s: Summary) -> str | None:
    """`-M prepared` against `-M extended` through each target (issue 5): what protocol-level
    prepared statements in transaction mode buy."""
    if not any(s.cell("prepared", t) and s.cell("extended", t) for t in s.pgmuxes):
        return None
    rows = []
    for target in [t for t in ("direct", *PGMUX_TARGETS) if t in s.targets]:
        tps = s.ratio("prepared", "tps", num=target, den=target, den_workload="extended")
        cpu = s.ratio("prepared", "cpu_us", num=target, den=target, den_workload="extended")
        if tps is None:
            continue
        pc, ec = s.cell("prepared", target), s.cell("extended", target)
        rows.append([TARGET_LABEL[target], f_num(ec.median("tps") if ec else None),
                     f_num(pc.median("tps") if pc else None), f"**{f_ratio(tps)}**", f_ratio(cpu)])
    headers = ["target", "-M extended TPS", "-M prepared TPS", "**prepared/extended TPS**",
               "prepared/extended pooler CPU per txn"]
    return md_table(headers, rows)


QUERY_STATS_GOAL = 1.03  # issue "per-query statistics": at most 3% more pooler CPU per transaction


def query_stats_cost(s: Summary) -> str | None:
    """One line: pgmux's CPU per transaction on -S, 50 clients with query_stats on (select-c50) over the
    same process with it off (select-c50-nostats), runs paired by repetition."""
    r = s.ratio("select-c50", "cpu_us", num="pgmux", den="pgmux", den_workload="select-c50-nostats")
    if r is None:
        return None
    tps = s.ratio("select-c50", "tps", num="pgmux", den="pgmux", den_workload="select-c50-nostats")
    met = "met" if r <= QUERY_STATS_GOAL else "**not met**"
    return (
        f"`-S`, 50 clients through pgmux, `query_stats = 1` (the default) against `query_stats = 0` in the same "
        f"process (SET on its console just before): pooler CPU per transaction **{f_ratio(r)}**, TPS {f_ratio(tps)}. "
        f"Goal: at most {QUERY_STATS_GOAL:.2f}x ({met})."
    )


def prepared_goal(s: Summary) -> str | None:
    """One line: `-M prepared` TPS / `-M extended` TPS through pgmux (and pgmux ×2), each pair from the same
    repetition, against the goal of issue "The engine", with direct PostgreSQL's ratio beside it."""
    parts = []
    for t in s.pgmuxes:
        r = s.ratio("prepared", "tps", num=t, den=t, den_workload="extended")
        if r is not None:
            parts.append(f"{TARGET_LABEL[t]} **{f_ratio(r)}** ({'met' if r >= PREPARED_GOAL else '**not met**'})")
    if not parts:
        return None
    direct = s.ratio("prepared", "tps", num="direct", den="direct", den_workload="extended")
    beside = f"; direct PostgreSQL {f_ratio(direct)} (no pooler)" if direct is not None else ""
    return (
        f"Goal (issue \"The engine\"): `-M prepared` TPS ≥ {PREPARED_GOAL}x `-M extended` TPS through pgmux. "
        f"This run, prepared/extended TPS: {', '.join(parts)}{beside}."
    )


def goals_table(s: Summary) -> str:
    """The measurable goals of issue 8, with this run's ratios: one ratio and one verdict per pgmux target
    (pgmux, pgmux ×2). A goal is met only if it holds in this run."""
    targets = s.pgmuxes
    rows = []

    def verdict(ok: bool | None) -> str:
        return "–" if ok is None else ("yes" if ok else "**no**")

    for key, label in (
        ("select-c50", "TPS ≥ 1.0x on -S -c 50"),
        ("select-c500", "TPS ≥ 1.0x on -S -c 500"),
        ("connect-md5", "TPS ≥ 1.0x on -C (md5)"),
        ("connect-scram", "TPS ≥ 1.0x on -C (SCRAM)"),
        ("rows-1k", "1,000-row result TPS ≥ 1.0x"),
    ):
        if not any((key, t) in s.cells for t in targets):
            continue
        row = [label]
        for t in targets:
            r = s.ratio(key, "tps", num=t)
            if (key, t) not in s.cells:
                row += ["not run", "–"]
            elif fails(s.cell(key, t)):
                row += [f"{TARGET_LABEL[t]} fails", "**no**"]
            else:
                row += [f_ratio(r), verdict(None if r is None else r >= 1.0)]
        rows.append(row)
    row = ["pooler CPU/txn ≤ 1.0x (worst workload)"]
    for t in targets:
        cpu = [(r, w.label) for w in s.workloads if w.kind == "pgbench"
               if (r := s.ratio(w.key, "cpu_us", num=t)) is not None]
        worst = max(cpu) if cpu else None
        row += [f"{f_ratio(worst[0])} ({worst[1]})", verdict(worst[0] <= 1.0)] if worst else ["–", "–"]
    if any(x != "–" for x in row[1:]):
        rows.append(row)
    if ("idle", "pgmux") in s.cells:
        row = ["RSS per idle client, against PgBouncer (reported)"]
        for t in targets:
            row += [f_ratio(s.ratio("idle", "kib_per_client", num=t)), "–"] if t == "pgmux" else ["not measured", "–"]
        rows.append(row)
    headers = ["goal (issue 8)"]
    for t in targets:
        headers += [ratio_name(t), f"met in this run ({TARGET_LABEL[t]})"]
    return md_table(headers, rows, align="l" + "rl" * len(targets))


def glance(s: Summary) -> list[str]:
    """Automatic one-liners: where pgmux (and pgmux ×2) is behind PgBouncer, where ahead."""
    lines = []
    for t in s.pgmuxes:
        name = TARGET_LABEL[t]
        tps = sorted((r, w.label) for w in s.workloads if w.kind == "pgbench"
                     if (r := s.ratio(w.key, "tps", num=t)) is not None)
        slow = [f"{lbl} ({r:.2f}x)" for r, lbl in tps if r < 1.0]
        fast = [f"{lbl} ({r:.2f}x)" for r, lbl in tps if r >= 1.0]
        if slow:
            lines.append(f"{name} TPS below PgBouncer's: " + "; ".join(slow) + ".")
        if fast:
            lines.append(f"{name} TPS at or above PgBouncer's: " + "; ".join(fast) + ".")
        cpus = sorted(((r, w.label) for w in s.workloads if w.kind == "pgbench"
                       if (r := s.ratio(w.key, "cpu_us", num=t)) is not None), reverse=True)
        if cpus:
            what = " (supervisor + workers)" if t == "pgmux2" else ""
            lines.append(
                f"{name} CPU per transaction{what} relative to PgBouncer: "
                + "; ".join(f"{lbl} {r:.2f}x" for r, lbl in cpus)
                + "."
            )
    if len(s.pgmuxes) == 2:
        pairs = [
            (
                w.label,
                s.ratio(w.key, "tps", num="pgmux2", den="pgmux"),
                s.ratio(w.key, "cpu_us", num="pgmux2", den="pgmux"),
            )
            for w in s.workloads
            if w.kind == "pgbench"
        ]
        pairs = [p for p in pairs if p[1] is not None]
        if pairs:
            lines.append(
                "pgmux ×2 against single-process pgmux (TPS, CPU per transaction): "
                + "; ".join(f"{lbl} {r:.2f}x TPS, {f_ratio(c)} CPU" for lbl, r, c in pairs)
                + "."
            )
    r = s.ratio("idle", "kib_per_client")
    if r is not None:
        lines.append(f"Memory per idle client: pgmux uses {r:.2f}x PgBouncer's.")
    for t in s.pgmuxes:
        p99, cpu = s.ratio(BURST_KEY, "p99_ms", num=t), s.ratio(BURST_KEY, "cpu_s", num=t)
        if p99 is not None and cpu is not None:
            lines.append(f"Login burst through {TARGET_LABEL[t]}: p99 login time {p99:.2f}x PgBouncer's, pooler CPU "
                         f"{cpu:.2f}x.")
    for t in s.poolers:
        c = s.cell(BURST_KEY, t)
        worst = max((int(r.extra.get("failed", 0)) for r in c.ok_runs), default=0) if c else 0  # type: ignore[call-overload]
        if worst:
            lines.append(f"Login burst through {TARGET_LABEL[t]}: up to {worst:,} clients refused or failed.")
    failed = [
        f"{w.label} via {TARGET_LABEL[t]}: {(fails(s.cell(w.key, t)) or '').removeprefix('fails: ')}"
        for w in s.workloads
        for t in w.targets
        if fails(s.cell(w.key, t))
    ]
    if failed:
        lines.append("Failed: " + "; ".join(failed) + ".")
    return lines


def burst_errors(r: RunResult) -> str:
    """'N refused: <text> (count); <text> (count)' for a login-burst run with refusals, else ''."""
    counts = r.extra.get("error_counts") if r.workload == BURST_KEY else None
    if not r.extra.get("failed") or not isinstance(counts, dict):
        return ""
    return f"{r.extra['failed']} refused: " + "; ".join(f"{text} ({c})" for text, c in list(counts.items())[:3])


def raw_table(s: Summary) -> str:
    headers = [
        "rep",
        "workload",
        "target",
        "TPS",
        "txns",
        "mean ms",
        "p99 ms",
        "CPU µs/txn (window / whole)",
        "machine CPU µs/txn, idle",
        "pooler RSS MiB",
        "error",
    ]
    rows = []
    order = {w.key: i for i, w in enumerate(s.workloads)}
    for r in sorted(s.results, key=lambda r: (r.rep, order.get(r.workload, 99))):
        if r.workload == "idle":
            cpu = f_num(r.extra.get("cpu_us_per_login"), 1) + " per login" if r.ok else "–"
            tps = f"{f_num(r.extra.get('kib_per_client'), 2)} KiB/client" if r.ok else "–"
            txns = f_num(r.extra.get("held")) if r.ok else "–"
        elif r.workload == BURST_KEY:
            cpu = f_num(r.extra.get("cpu_us_per_login"), 1) + " per login" if r.ok else "–"
            tps = f"{f_num(r.extra.get('logged_in'))} in, {f_num(r.extra.get('failed'))} refused" if r.ok else "–"
            txns = f"{f_num(r.extra.get('burst_s'), 2)} s" if r.ok else "–"
        else:
            cpu = "–" if r.cpu_us is None else f"{f_num(r.cpu_us, 1)} / {f_num(r.cpu_us_whole, 1)}"
            sup = r.extra.get("cpu_us_supervisor")
            if isinstance(sup, float) and r.cpu_us is not None:
                cpu += f" ({r.extra.get('processes')} processes; supervisor alone {sup:.2f})"
            tps, txns = f_num(r.tps), f_num(r.txns) if r.txns else "–"
        host, idle = r.extra.get("host_cpu_us"), r.extra.get("host_idle_pct")
        machine = f"{f_num(host, 1)}, {f_num(idle, 0)}%" if isinstance(host, float) and isinstance(idle, float) else "–"
        rows.append(
            [
                str(r.rep + 1),
                r.workload,
                TARGET_LABEL[r.target],
                tps,
                txns,
                f_ms(r.mean_ms),
                f_ms(r.p99_ms),
                cpu,
                machine,
                f_num(r.rss_kb / 1024, 1) if r.rss_kb else "–",
                (r.error or burst_errors(r)).replace("|", "\\|"),
            ]
        )
    return md_table(headers, rows, align="lllrrrrrrrl")


# --------------------------------------------------------------------------------------------------
# chart


def chart(s: Summary, path: str, title: str) -> str | None:
    """Grouped bars: TPS per workload (direct, PgBouncer, pgmux, pgmux ×2), CPU µs/txn, KiB per idle client.

    Returns None on success, else why no chart was written (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not installed ({e}); pip install '.[bench]'"

    colors = {"direct": "#9e9e9e", "pgbouncer": "#1f77b4", "pgmux": "#ff7f0e", "pgmux2": "#a0522d"}
    wls = [w for w in s.workloads if w.kind == "pgbench" and s.ran(w)]
    has_idle = any(("idle", t) in s.cells for t in ("pgbouncer", "pgmux"))
    fig = plt.figure(figsize=(14, 12 if has_idle else 9.5))
    gs = fig.add_gridspec(3 if has_idle else 2, 1, height_ratios=[1.15, 1, 0.55] if has_idle else [1.15, 1])
    ax1, ax2 = fig.add_subplot(gs[0]), fig.add_subplot(gs[1])
    x = list(range(len(wls)))
    labels = [w.label.replace(", ", "\n") for w in wls]

    def no_bar(ax, xpos: float, text: str, target: str) -> None:
        """Write ``text`` upright at the foot of the slot of a bar that is not drawn."""
        ax.text(xpos, 0.02, text, rotation=90, ha="center", va="bottom", fontsize=8, color=colors[target],
                transform=ax.get_xaxis_transform())

    def bars(ax, targets, metric, width):
        shown = [v for w in wls for t in targets if (c := s.cell(w.key, t)) and (v := c.median(metric))]
        for i, t in enumerate(targets):
            off = (i - (len(targets) - 1) / 2) * width
            for j, w in enumerate(wls):
                c = s.cell(w.key, t)
                xpos = j + off
                if t not in w.targets:
                    no_bar(ax, xpos, "n/a", t)
                    continue
                if c is None:
                    continue
                v = c.median(metric)
                if v is None:
                    no_bar(ax, xpos, "fails" if fails(c) else "–", t)
                    continue
                sp = c.span(metric)
                yerr = [[v - sp[0]], [sp[1] - v]] if sp and sp[1] > sp[0] else None
                ax.bar(xpos, v, width, color=colors[t], yerr=yerr, capsize=2, ecolor="#444444", label=TARGET_LABEL[t])
                ax.text(xpos, v, f_num(v, 1 if v < 100 else 0), ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_yscale("log")
        if shown:
            # log bars need a common floor: one decade below the smallest value, headroom for the labels
            ax.set_ylim(10 ** math.floor(math.log10(min(shown) * 0.5)), max(shown) * 6)

    def ratios_above(ax, metric: str, better_low: bool) -> None:
        # one line per pgmux target, bottom line pgmux, above it pgmux ×2 (prefixed "x2")
        for k, t in enumerate(s.pgmuxes):
            for j, w in enumerate(wls):
                r = s.ratio(w.key, metric, num=t)
                if r is None:
                    continue
                bad = r > 1.0 if better_low else r < 1.0
                ax.text(
                    j,
                    1.01 + 0.055 * k,
                    ("x2 " if t == "pgmux2" else "") + f"{r:.2f}x",
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    fontweight="bold",
                    color="#d62728" if bad else "#2ca02c",
                    transform=ax.get_xaxis_transform(),
                )

    which = (
        "ratio to PgBouncer above each group (lower: pgmux, upper: pgmux ×2)"
        if len(s.pgmuxes) == 2
        else "".join(f"ratio {ratio_name(t)} above each group" for t in s.pgmuxes)
    )
    pad = 16 + 12 * max(0, len(s.pgmuxes) - 1)
    bars(ax1, s.targets, "tps", 0.8 / max(1, len(s.targets)))
    ax1.set_ylabel("transactions/s (log scale)")
    ax1.set_title(f"Throughput (median of repetitions; whiskers: min–max); TPS {which}", pad=pad)
    ratios_above(ax1, "tps", better_low=False)

    bars(ax2, s.poolers, "cpu_us", 0.8 / max(1, len(s.poolers)))
    ax2.set_ylabel("pooler CPU µs per transaction (log)")
    x2 = "; pgmux ×2: supervisor + workers" if "pgmux2" in s.targets else ""
    ax2.set_title(f"Pooler's own CPU per transaction (schedstat{x2}); {which}", pad=pad)
    ratios_above(ax2, "cpu_us", better_low=True)
    for ax in (ax1, ax2):
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=8)
        ax.grid(axis="y", alpha=0.3, which="both")
        ax.set_xlim(-0.6, len(wls) - 0.4)

    if has_idle:
        ax3 = fig.add_subplot(gs[2])
        names, vals, cols = [], [], []
        for t in ("pgbouncer", "pgmux"):
            c = s.cell("idle", t)
            v = c.extra_median("kib_per_client") if c else None
            if v is not None:
                names.append(TARGET_LABEL[t])
                vals.append(v)
                cols.append(colors[t])
        ax3.barh(names, vals, color=cols)
        for i, v in enumerate(vals):
            ax3.text(v, i, f" {v:.2f} KiB", va="center", fontsize=9)
        r = s.ratio("idle", "kib_per_client")
        ax3.set_title("Pooler RSS per idle client connection" + (f" (pgmux/PgBouncer {r:.2f}x)" if r else ""))
        ax3.set_xlabel("KiB per idle client")
        ax3.set_xlim(0, max(vals, default=1) * 1.25)
    fig.suptitle(title, fontsize=11)
    from matplotlib.patches import Patch

    handles = [Patch(color=colors[t], label=TARGET_LABEL[t]) for t in s.targets]
    fig.legend(
        handles=handles,
        loc="upper center",
        ncol=max(1, len(handles)),
        fontsize=9,
        frameon=False,
        bbox_to_anchor=(0.5, 0.975),
    )
    fig.tight_layout(rect=(0, 0, 1, 0.965))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
