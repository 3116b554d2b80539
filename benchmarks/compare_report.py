"""The pure half of ``compare.py``: rows, medians, ratios, goals, Markdown, plots, README.

Nothing here starts a process or reads a clock, so ``tests/test_benchmark_report.py``
can check it with made-up runs. A *run* is one round: ``{system: harness JSON}``; a
harness that failed has ``{"error": ...}`` instead.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TIMES = "\u00d7"
DASH = "\u2013"
START = "<!-- compare:start -->"
END = "<!-- compare:end -->"

# (key, column title); the order of the columns and of the harness command lines.
SYSTEMS: list[tuple[str, str]] = [
    ("floor", "floor (redis-py RPC)"),
    ("nbtask", "nbtask (Redis)"),
    ("nbtask-amqp", "nbtask (RabbitMQ)"),
    ("celery", "Celery"),
    ("rq-simple", "RQ SimpleWorker"),
    ("rq-fork", "RQ Worker (fork)"),
    ("dask", "Dask LocalCluster"),
    ("ipyparallel", "ipyparallel"),
]
TITLE = dict(SYSTEMS)
NBTASK = ("nbtask", "nbtask-amqp")
PEERS = ("dask", "rq-simple", "rq-fork", "ipyparallel")


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    path: tuple[str, ...]
    fmt: str
    better: str | None = "low"  # "low", "high", or None (no direction)
    vs_floor: bool = True  # a ratio to the floor is meaningful


ROWS = [
    Row("rt_p50", "no-op round trip p50 (\u00b5s)", ("latency", "p50_us"), ",.0f"),
    Row("rt_p99", "no-op round trip p99 (\u00b5s)", ("latency", "p99_us"), ",.0f"),
    Row("tp_loop", "throughput, one submit per task (tasks/s)",
        ("throughput_loop", "tasks_per_s"), ",.0f", "high"),
    Row("tp_batch", "throughput, batch API (tasks/s)",
        ("throughput_batch", "tasks_per_s"), ",.0f", "high"),
    Row("data", "50 MB numpy argument -> sum (s)", ("data_50mb", "median_s"), ".3f"),
    Row("ev_seen", "progress, 100 updates 10 ms apart: seen",
        ("progress", "spaced", "seen"), ".0f", "high", False),
    Row("ev_p50", "progress, 10 ms apart: latency p50 (ms)",
        ("progress", "spaced", "p50_ms"), ".2f"),
    Row("ev_burst", "progress, 100 back to back: seen",
        ("progress", "burst", "seen"), ".0f", None, False),
    Row("cold", "cold start: start workers -> 1st result (s)",
        ("cold_start", "first_result_s"), ".2f"),
    Row("cold_embedded", "cold start: nbtask `App()` from nothing (s)",
        ("embedded", "cold_start", "first_result_s"), ".2f", "low", False),
    Row("import", "import of the client library (s)", ("import_s",), ".2f", "low", False),
    Row("cell_plain", "notebook cell `x = 1`, plain (ms)",
        ("cell", "plain", "reply_p50_ms"), ".1f", None, False),
    Row("cell", "notebook cell, remote equivalent (ms)",
        ("cell", "remote", "reply_p50_ms"), ".1f"),
    Row("cell_ratio", "remote cell / plain cell, same kernel",
        ("cell", "ratio_to_plain"), ".2f", "low", False),
    Row("rss", "idle RSS per worker process, max (MiB)",
        ("idle_memory", "worker_rss_max_mib"), ".1f", "low", False),
    Row("uss", "idle USS per worker process, max (MiB)",
        ("idle_memory", "worker_uss_max_mib"), ".1f", "low", False),
    Row("rss_all", "RSS of every process started (MiB)",
        ("idle_memory", "started_rss_total_mib"), ".0f", "low", False),
]  # fmt: skip
ROW = {r.key: r for r in ROWS}
SMALL_TASK_ROWS = ("rt_p50", "rt_p99", "tp_loop", "tp_batch", "cell")


# --------------------------------------------------------------------------- numbers


def get(d: Any, path: Sequence[str]) -> float | None:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return float(d) if isinstance(d, int | float) and not isinstance(d, bool) else None


def values(runs: Sequence[dict[str, Any]], system: str, path: Sequence[str]) -> list[float]:
    out = [get(r.get(system), path) for r in runs]
    return [v for v in out if v is not None]


def median(runs: Sequence[dict[str, Any]], system: str, row: str) -> float | None:
    vals = values(runs, system, ROW[row].path)
    return statistics.median(vals) if vals else None


def cell(vals: Sequence[float], fmt: str) -> str:
    if not vals:
        return DASH
    med = format(statistics.median(vals), fmt)
    if len(vals) == 1:
        return med
    return f"{med} [{format(min(vals), fmt)}{DASH}{format(max(vals), fmt)}]"


def ratio_to_floor(runs: Sequence[dict[str, Any]], system: str, row: Row) -> float | None:
    """``system / floor`` of the medians (for tasks/s: ``floor / system``: >1 is slower)."""
    mine = median(runs, system, row.key)
    floor = median(runs, "floor", row.key)
    if mine is None or floor is None or mine == 0 or floor == 0:
        return None
    return floor / mine if row.better == "high" else mine / floor


@dataclass(frozen=True)
class Goal:
    text: str
    ratio: float | None  # the measured ratio, oriented so that bigger is better
    need: float
    met: bool | None
    detail: str = ""


def _speedup(runs: Sequence[dict[str, Any]], nb: str, peer: str, row: str) -> float | None:
    """How many times better ``nb`` is than ``peer`` on ``row`` (>1: nbtask ahead)."""
    a, b = median(runs, nb, row), median(runs, peer, row)
    if a is None or b is None or a == 0 or b == 0:
        return None
    return a / b if ROW[row].better == "high" else b / a


def goals(runs: Sequence[dict[str, Any]], nb: str = "nbtask") -> list[Goal]:
    """The issue's goals, from the medians of this one run of the comparison."""
    out: list[Goal] = []

    def at_least(text: str, r: float | None, need: float) -> None:
        out.append(Goal(text, r, need, None if r is None else r >= need))

    at_least("round trip p50: Celery / nbtask", _speedup(runs, nb, "celery", "rt_p50"), 3.0)
    at_least("throughput, one submit per task: nbtask / Celery",
             _speedup(runs, nb, "celery", "tp_loop"), 4.0)  # fmt: skip
    at_least("throughput, batch API: nbtask / Celery",
             _speedup(runs, nb, "celery", "tp_batch"), 4.0)  # fmt: skip
    for peer in PEERS:
        ups = {row: _speedup(runs, nb, peer, row) for row in SMALL_TASK_ROWS}
        known = {k: v for k, v in ups.items() if v is not None}
        behind = [ROW[k].label.split(" (")[0] for k, v in known.items() if v <= 1.0]
        worst = min(known.values()) if known else None
        met = None if not known else not behind
        detail = ("behind on: " + "; ".join(behind)) if behind else ""
        out.append(Goal(f"ahead of {TITLE[peer]} on every small-task case (least lead)",
                        worst, 1.0, met, detail))  # fmt: skip
    cell_ratio = median(runs, nb, "cell_ratio")
    out.append(
        Goal(
            "`%%task --wait` cell / plain cell (at most)",
            cell_ratio,
            1.5,
            None if cell_ratio is None else cell_ratio <= 1.5,
        )
    )
    return out


# --------------------------------------------------------------------------- Markdown


def present(runs: Sequence[dict[str, Any]], systems: Sequence[str]) -> list[str]:
    """The systems (in table order) that have a result in at least one run."""
    return [s for s in systems if any("error" not in r.get(s, {"error": 1}) for r in runs)]


def tables(runs: Sequence[dict[str, Any]], systems: Sequence[str]) -> str:
    cols = present(runs, systems)
    head = "| case | " + " | ".join(TITLE[s] for s in cols) + " |"
    rule = "|---|" + "---|" * len(cols)
    lines = [head, rule]
    for row in ROWS:
        cells = [cell(values(runs, s, row.path), row.fmt) for s in cols]
        if all(c == DASH for c in cells):
            continue
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    mech = [
        next((str(r[s]["progress"]["spaced"]["mechanism"])
              for r in runs if "progress" in r.get(s, {})), DASH)
        for s in cols
    ]  # fmt: skip
    lines.append("| progress mechanism | " + " | ".join(mech) + " |")

    lines += ["", "Ratio to the floor (median / floor median; for tasks/s floor / median: "
              f"above 1{TIMES} is slower than the floor):", "", head, rule]  # fmt: skip
    for row in ROWS:
        if not row.vs_floor:
            continue
        ratios = [ratio_to_floor(runs, s, row) for s in cols]
        if all(r is None for r in ratios):
            continue
        cells = [DASH if r is None else f"{r:.2f}{TIMES}" for r in ratios]
        lines.append(f"| {row.label.split(' (')[0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals_table(runs: Sequence[dict[str, Any]]) -> str:
    nbs = [nb for nb in NBTASK if present(runs, [nb])]
    if not nbs:
        return "(no nbtask result in this run: no goals to check)"
    lines = ["| goal | needed | " + " | ".join(TITLE[nb] for nb in nbs) + " |",
             "|---|---|" + "---|" * len(nbs)]  # fmt: skip
    per_nb = {nb: goals(runs, nb) for nb in nbs}
    for i, g in enumerate(goals(runs, nbs[0] if nbs else "nbtask")):
        need = f"{'<=' if 'at most' in g.text else '>='} {g.need:g}{TIMES}"
        cells = []
        for nb in nbs:
            mine = per_nb[nb][i]
            if mine.met is None:
                cells.append("n/a")
                continue
            verdict = "met" if mine.met else "**not met**"
            extra = f" ({mine.detail})" if mine.detail else ""
            cells.append(f"{mine.ratio:.2f}{TIMES} {verdict}{extra}")
        lines.append(f"| {g.text} | {need} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PLOTS = ("latency", "throughput", "data", "events", "cold_start", "cell", "memory")


def readme_block(
    runs: Sequence[dict[str, Any]], meta: dict[str, Any], systems: Sequence[str], img_dir: str
) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in sorted(meta.get("versions", {}).items()))
    n = len(runs)
    kind = f"{n} interleaved rounds" if n != 1 else "1 round"
    if meta.get("quick"):
        kind += " with the quick (`--quick`) counts"
    lines = [
        START,
        "<!-- Generated by `python benchmarks/compare.py`; edit that, not this block. -->",
        "",
        f"Measured {meta.get('started', '?')} on {meta.get('platform', '?')}, "
        f"{meta.get('cpus', '?')} cores, Python {meta.get('python', '?')}, "
        f"Redis {meta.get('redis_version', '?')} (private, no persistence), "
        f"RabbitMQ {meta.get('rabbitmq_version', '?')}; {kind}, every system in a fresh "
        "process per round with 2 worker processes. Median [min\u2013max] over the rounds.",
        "",
        f"Versions: {versions}; nbtask at commit {meta.get('commit', '?')}.",
        "",
        "Load average (1 min) before each round, on a machine shared with other work: "
        + ", ".join(f"{r['loadavg_before'][0]:.1f}" for r in runs if "loadavg_before" in r)
        + ".",
        "",
        tables(runs, systems),
        "",
        "Goals, as ratios within this same run:",
        "",
        goals_table(runs),
        "",
    ]
    lines += [f"![{name}]({img_dir}/{name}.png)" for name in PLOTS]
    lines += ["", END]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """Put ``block`` (which carries the markers) in place of the marked part of ``text``."""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.DOTALL)
    if len(pattern.findall(text)) != 1:
        raise ValueError(f"expected exactly one {START} ... {END} block")
    return pattern.sub(lambda _m: block, text)


# --------------------------------------------------------------------------- plots


def number(v: float) -> str:
    """A plot label: three significant digits, thousands separated, no exponent."""
    if v >= 100 or v == int(v):
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _bars(
    ax: Any,
    runs: Sequence[dict[str, Any]],
    systems: Sequence[str],
    series: Sequence[tuple[str, Sequence[str]]],
    log: bool,
) -> None:
    n = len(series)
    height = 0.8 / n
    top = 0.0
    for j, (label, path) in enumerate(series):
        meds, lo, hi, ys = [], [], [], []
        for i, s in enumerate(systems):
            vals = values(runs, s, path)
            if not vals:
                continue
            m = statistics.median(vals)
            meds.append(m)
            lo.append(m - min(vals))
            hi.append(max(vals) - m)
            ys.append(i + (j - (n - 1) / 2) * height)
        ax.barh(ys, meds, height=height, xerr=[lo, hi], label=label, capsize=2)
        for y, m, h in zip(ys, meds, hi, strict=True):
            ax.annotate(f" {number(m)}", (m + h, y), va="center", fontsize=7)
            top = max(top, m + h)
    ax.set_yticks(range(len(systems)), [TITLE[s] for s in systems])
    ax.invert_yaxis()
    if log:
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: number(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    if top > 0:  # room for the labels
        ax.set_xlim(right=top * (4 if log else 1.18))
    ax.grid(axis="x", alpha=0.3, which="both")
    if n > 1:
        ncol = 1 if sum(len(label) for label, _ in series) > 60 else n
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=ncol)


def _figure(
    path: Path,
    title: str,
    panels: Sequence[tuple[str, Sequence[tuple[str, Sequence[str]]], bool, Sequence[str]]],
    subtitle: str,
    runs: Sequence[dict[str, Any]],
) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.6), squeeze=False)
    for ax, (xlabel, series, log, systems) in zip(axes[0], panels, strict=True):
        _bars(ax, runs, systems, series, log)
        ax.set_xlabel(xlabel)
    fig.suptitle(f"{title}\n{subtitle}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plots(
    runs: Sequence[dict[str, Any]], systems: Sequence[str], out_dir: Path, subtitle: str
) -> list[Path]:
    """Write the PNGs (matplotlib, Agg); bars are medians, whiskers [min-max]."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = present(runs, systems)
    P = ROW
    specs: dict[str, tuple[str, list[Any]]] = {
        "latency": ("No-op round trip, sequential (lower is better)", [
            ("\u00b5s (log)", [("p50", P["rt_p50"].path), ("p99", P["rt_p99"].path)], True, cols)]),
        "throughput": ("No-op throughput, 2 worker processes (higher is better)", [
            ("tasks/s (log)", [("one submit per task", P["tp_loop"].path),
                               ("batch API", P["tp_batch"].path)], True, cols)]),
        "data": ("50 MB numpy array as the argument, its sum returned (lower is better)", [
            ("s (log)", [("round trip", P["data"].path)], True, cols)]),
        "events": ("100 progress updates from one task, seen by the client", [
            ("updates seen of 100", [("10 ms apart", P["ev_seen"].path),
                                     ("back to back", P["ev_burst"].path)], False, cols),
            ("ms, 10 ms apart (log)", [("latency p50", P["ev_p50"].path)], True, cols)]),
        "cold_start": ("Cold start: from nothing to the first result (lower is better)", [
            ("s", [("start the workers / local cluster (the broker is already up)",
                    P["cold"].path),
                   ("nbtask App() with no broker: starts its own Redis and workers too",
                    P["cold_embedded"].path)], False, cols)]),
        "cell": ("A trivial notebook cell through a real kernel, execute request to reply", [
            ("ms (log)", [("plain x = 1", P["cell_plain"].path),
                          ("remote equivalent", P["cell"].path)], True, cols)]),
        "memory": ("Idle memory per worker process (lower is better)", [
            ("MiB", [("RSS", P["rss"].path), ("USS", P["uss"].path)], False, cols)]),
    }  # fmt: skip
    written = []
    for name in PLOTS:
        title, panels = specs[name]
        path = out_dir / f"{name}.png"
        _figure(path, title, panels, subtitle, runs)
        written.append(path)
    return written
