"""Medians over runs, the ratios against the baselines, the table, the chart, py-spy summaries."""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path
from typing import Any

NUMERIC = ("value", "p50_ms", "p99_ms", "max_ms", "lg_cpu", "lg_cpu_producer", "srv_cpu",
           "srv_rss_mb", "pg_cpu", "sent_rate", "served", "connections", "rss0_mb", "host_cpu",
           "other_cpu", "per_srv_core", "messages_per_s", "upgrade_ms", "stream_event_ms",
           "journal_rows", "value_before_cut", "seconds_before_cut", "scrapes", "scrape_ok",
           "scrape_ms_p50", "scrape_ms_max", "scrape_bytes_p50", "scrape_bytes_max",
           "scrape_samples", "scrape_cpu_s")
# Figures that count things by kind (reason or status -> count): summed over the runs.
COUNTS = ("scrape_status", "scrape_errors")


def _median(values: list[Any]) -> Any:
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(values) if values else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Median of every figure over the runs of each scenario (errors are counted, not used)."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_name.setdefault(r["name"], []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for name, recs in by_name.items():
        good = [r for r in recs if "error" not in r]
        s: dict[str, Any] = {"name": name, "runs": len(good), "errors": len(recs) - len(good)}
        if good:
            s["metric"], s["unit"] = good[0]["metric"], good[0]["unit"]
            for key in NUMERIC:
                s[key] = _median([r.get(key) for r in good])
            s["drops"] = _summed(good, "drops")
            s.update({key: _summed(good, key) for key in COUNTS if any(key in r for r in good)})
            if "steps" in good[0]:
                steps = []
                for i, step in enumerate(good[0]["steps"]):
                    at = [r["steps"][i] for r in good if len(r["steps"]) > i]
                    steps.append({k: (_median([a.get(k) for a in at])
                                      if isinstance(step.get(k), (int, float)) else step.get(k))
                                  for k in step})
                s["steps"] = steps
        out[name] = s
    return out


def _summed(records: list[dict[str, Any]], key: str) -> dict[str, int]:
    """A count-by-kind figure (e.g. drops) added up over the records."""
    total: Counter[str] = Counter()
    for r in records:
        total.update(r.get(key) or {})
    return dict(total)


def ratios(summary: dict[str, dict[str, Any]], params: Any) -> list[dict[str, Any]]:
    """The targets, each with its measured value and pass/fail (None: not measured)."""
    def val(name: str, key: str = "value") -> float | None:
        s = summary.get(name)
        return s.get(key) if s else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    rows = []
    n = params.ceiling_readers
    r = ratio(val(f"fanout-{n}"), val(f"stack-ceiling-{n}"))
    rows.append({"what": f"fanout-{n} / stack ceiling ({n} readers), deliveries/s",
                 "value": r, "target": ">= 0.8", "pass": None if r is None else r >= 0.8})
    r = ratio(val("fanout-1"), val("pg-ceiling"))
    rows.append({"what": "fanout-1 deliveries/s / PostgreSQL ceiling notifications/s",
                 "value": r, "target": ">= 0.9", "pass": None if r is None else r >= 0.9})
    r = ratio(val("writers"), val("pg-writers"))
    rows.append({"what": f"writers / psycopg2 writers ({params.writers} each), envelopes/s",
                 "value": r, "target": ">= 1.0", "pass": None if r is None else r >= 1.0})
    p99 = val("paced", "p99_ms")
    rows.append({"what": f"paced p99 latency ({params.paced_readers} readers x "
                         f"{params.paced_rate:g}/s), ms",
                 "value": p99, "target": "<= 50", "pass": None if p99 is None else p99 <= 50})
    conn = summary.get("connections")
    for step in (conn or {}).get("steps", []):
        per = step.get("rss_per_conn_kb")
        rows.append({"what": f"pgws RSS per idle connection at {step['connections']:.0f}, KB",
                     "value": per, "target": "<= 10", "pass": None if per is None else per <= 10})
    if conn and conn.get("runs"):
        want = max(params.connections)
        got, served = conn.get("connections"), conn.get("served")
        ok = got is not None and served is not None and got >= want and served >= want
        rows.append({"what": f"{want} concurrent connections served (opened / got a notification)",
                     "value": f"{got:.0f} / {served:.0f}" if got is not None and served is not None
                     else None,
                     "target": f"{want} / {want}", "pass": ok})
    return rows + journal_ratios(summary, params) + metrics_ratios(summary, params)


# The comparisons of one scenario with its counterpart (journal on / off, metrics on / off):
# a row per figure, on / off, with a target or None ("info").


def _figure(summary: dict[str, dict[str, Any]], name: str, key: str = "value") -> Any:
    s = summary.get(name)
    return s.get(key) if s else None


def _ratio_of(summary: dict[str, dict[str, Any]], on: str, off: str,
              key: str = "value") -> float | None:
    a, b = _figure(summary, on, key), _figure(summary, off, key)
    return a / b if a is not None and b else None


def _row(what: str, value: Any, target: str | None, ok: Any) -> dict[str, Any]:
    return {"what": what, "value": value, "target": target,
            "pass": None if value is None or target is None else ok(value)}


def journal_ratios(summary: dict[str, dict[str, Any]], params: Any) -> list[dict[str, Any]]:
    """The journal's targets: each journal-on figure against its journal-off counterpart."""
    def ratio(on: str, off: str) -> float | None:
        return _ratio_of(summary, on, off)

    n = params.journal_readers
    ms = _figure(summary, "journal-resume")
    return [
        _row(f"journal-fanout-{n} / fanout-{n} (journal on / off), deliveries/s",
            ratio(f"journal-fanout-{n}", f"fanout-{n}"), ">= 0.5", lambda v: v >= 0.5),
        _row(f"journal-fanout-{n} / fanout-{n} while every reader was connected (seconds of the "
            "window before pgws cut the first one off), deliveries/s",
            _ratio_of(summary, f"journal-fanout-{n}", f"fanout-{n}", "value_before_cut"), None,
            None),
        _row(f"journal-fanout-{n}-plain / fanout-{n} (journal on, readers without positions / "
            "off), deliveries/s", ratio(f"journal-fanout-{n}-plain", f"fanout-{n}"), None, None),
        _row(f"journal-writers / writers (journal on / off, {params.writers} writers), envelopes/s",
            ratio("journal-writers", "writers"), None, None),
        _row(f"journal-producers / producers (<schema>.send / pg_notify, {params.producers} "
            f"processes x {params.producer_batch} per transaction), messages/s",
            ratio("journal-producers", "producers"), ">= 0.5", lambda v: v >= 0.5),
        _row("journal-producers-array / producers (send(channel, payloads[]) per batch / "
            "pg_notify), messages/s", ratio("journal-producers-array", "producers"), None, None),
        _row(f"journal-resume: connect to the {params.resume_messages:,}th replayed message, ms",
            ms, "< 1000", lambda v: v < 1000),
    ]


def metrics_ratios(summary: dict[str, dict[str, Any]], params: Any) -> list[dict[str, Any]]:
    """
    The cost of metrics on fan-out, metrics-on-fanout-N (metrics = true, /metrics scraped once
    a second) against metrics-off-fanout-N (metrics = false), without targets: deliveries/s on
    / off, and pgws's CPU per delivered frame on / off (server cores / deliveries/s; from the
    medians of deliveries per server core-second, off / on); then what the scrapes got.
    """
    n = params.metrics_readers
    on, off = f"metrics-on-fanout-{n}", f"metrics-off-fanout-{n}"
    rows = [
        _row(f"{on} / {off} (metrics on and scraped / off), deliveries/s",
             _ratio_of(summary, on, off), None, None),
        _row(f"{on} / {off} while every reader was connected (seconds of the window before "
             "pgws cut the first one off), deliveries/s",
             _ratio_of(summary, on, off, "value_before_cut"), None, None),
        _row(f"{on} / {off}, pgws CPU per delivered frame",
             _ratio_of(summary, off, on, "per_srv_core"), None, None),
    ]
    rows += [
        _row("metrics-on-paced / metrics-off-paced (metrics on and scraped / off), pgws CPU",
             _ratio_of(summary, "metrics-on-paced", "metrics-off-paced", "srv_cpu"), None, None),
        _row("metrics-on-paced / metrics-off-paced, p99 latency",
             _ratio_of(summary, "metrics-on-paced", "metrics-off-paced", "p99_ms"), None, None),
    ]
    made, ok = _figure(summary, on, "scrapes"), _figure(summary, on, "scrape_ok")
    if made is not None:
        answers = {**(_figure(summary, on, "scrape_status") or {}),
                   **(_figure(summary, on, "scrape_errors") or {})}
        shown = ", ".join(f"{k}: {v}" for k, v in sorted(answers.items()))
        rows.append(_row(f"{on}: GET /metrics answered 200 (median of runs; all runs' answers "
                         "by status or error)", f"{ok:.0f} of {made:.0f} ({shown})", None, None))
    return rows


def _fmt(v: Any, digits: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if digits == 0 and abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.{max(digits, 1)}f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def table(summary: dict[str, dict[str, Any]], order: list[str]) -> str:
    head = ["scenario", "result", "unit", "p50 ms", "p99 ms", "max ms", "sent/s",
            "loadgen CPU (producer)", "server CPU", "per server core", "server RSS MB", "PG CPU",
            "other CPU", "dropped", "runs"]
    rows = [head]
    for name in order:
        s = summary.get(name)
        if s is None:
            continue
        if not s["runs"]:
            rows.append([name, "ERROR"] + [""] * (len(head) - 3) + [f"0 ({s['errors']} failed)"])
            continue
        drops = sum((s.get("drops") or {}).values())
        lg = _fmt(s["lg_cpu"], 2)
        if s.get("lg_cpu_producer"):
            lg += f" ({s['lg_cpu_producer']:.2f})"
        rows.append([
            name, _fmt(s["value"]), s["unit"], _fmt(s["p50_ms"], 1), _fmt(s["p99_ms"], 1),
            _fmt(s["max_ms"], 1), _fmt(s["sent_rate"]), lg, _fmt(s["srv_cpu"], 2),
            _fmt(s.get("per_srv_core")), _fmt(s["srv_rss_mb"], 1), _fmt(s["pg_cpu"], 2),
            _fmt(s.get("other_cpu"), 2), str(drops),
            f"{s['runs']}" + (f" ({s['errors']} failed)" if s["errors"] else ""),
        ])
        for step in s.get("steps", []):
            rows.append([
                f"  {step['connections']:.0f} idle", _fmt(step["handshakes_per_s"]),
                "handshakes/s", _fmt(step.get("handshake_ms"), 1), "", "", "",
                _fmt(step["lg_cpu"], 2), _fmt(step["srv_cpu"], 2), _fmt(step.get("per_srv_core")),
                _fmt(step["rss_mb"], 1),
                "", "", str(step.get("failed", 0)),
                f"RSS/conn {_fmt(step['rss_per_conn_kb'], 1)} KB, "
                f"accept-queue drops {_fmt(step.get('listen_overflows'))}",
            ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                               enumerate(zip(r, widths, strict=True))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ratio_lines(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        v = r["value"]
        shown = v if isinstance(v, str) else ("-" if v is None else f"{v:.2f}")
        verdict = _verdict(r)
        out.append(f"  {verdict:4}  {r['what']}: {shown} ({_target(r)})")
    return "\n".join(out)


def _verdict(r: dict[str, Any]) -> str:
    if r["target"] is None:
        return "info"
    return {True: "PASS", False: "FAIL", None: "n/a"}[r["pass"]]


def _target(r: dict[str, Any]) -> str:
    return "no target" if r["target"] is None else f"target {r['target']}"


def chart(summary: dict[str, dict[str, Any]], order: list[str], rows: list[dict[str, Any]],
          path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in order if n in summary and summary[n].get("runs")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16, 0.55 * len(names) + 2.6 + 0.14 * len(rows)))
    y = list(range(len(names)))[::-1]
    baseline = ("pg-ceiling", "stack-ceiling", "paced-ceiling", "pg-writers")
    values = [summary[n]["value"] or 0 for n in names]
    colors = ["#999999" if n.startswith(baseline) else "#2b6cb0" for n in names]
    ax1.barh(y, values, color=colors)
    ax1.set_xscale("log")
    ax1.set_yticks(y, names)
    ax1.set_title("throughput (median; grey = baseline)")
    for yi, n, v in zip(y, names, values, strict=True):
        s = summary[n]
        server = f"server {s['srv_cpu']:.2f}" if s.get("srv_cpu") is not None else "no server"
        note = f" {v:,.0f} {s['unit']}  (cores: loadgen {s['lg_cpu'] or 0:.2f}, {server}"
        if s.get("pg_cpu") is not None:
            note += f", PG {s['pg_cpu']:.2f}"
        note += ")"
        if s.get("steps"):
            note += "; RSS/conn " + ", ".join(f"{st['rss_per_conn_kb'] or 0:.1f} KB @{st['connections']:.0f}"
                                              for st in s["steps"])
        ax1.text(v, yi, note, va="center", fontsize=7.5)
    positive = [v for v in values if v > 0] or [1]
    ax1.set_xlim(min(positive) / 3, max(positive) * 5000)

    lat_names = [n for n in names if summary[n].get("p50_ms") is not None]
    ly = list(range(len(lat_names)))[::-1]
    h = 0.27
    for k, (key, color) in enumerate((("p50_ms", "#68d391"), ("p99_ms", "#f6ad55"),
                                      ("max_ms", "#e53e3e"))):
        vals = [max(summary[n][key] or 0.05, 0.05) for n in lat_names]
        ax2.barh([yy + (1 - k) * h for yy in ly], vals, height=h, color=color,
                 label=key.replace("_ms", ""))
    ax2.set_xscale("log")
    ax2.set_yticks(ly, lat_names)
    ax2.axvline(50, color="k", linestyle=":", linewidth=1)
    ax2.set_xlabel("latency, ms (send time in the payload -> reader); dotted: 50 ms")
    ax2.set_title("latency (median of runs)")
    ax2.legend(loc="upper right", fontsize=8, ncols=3)
    verdicts = []
    for r in rows:
        v = r["value"]
        shown = v if isinstance(v, str) else ("-" if v is None else f"{v:.2f}")
        verdicts.append(f"{_verdict(r)}  {r['what']}: {shown} ({_target(r)})")
    fig.suptitle(title, fontsize=11)
    fig.text(0.01, 0.01, "\n".join(verdicts), fontsize=7.5, family="monospace", va="bottom")
    bottom = (0.2 + 0.14 * len(verdicts)) / fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, bottom, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def top_functions(raw_path: Path, n: int = 15) -> dict[str, Any]:
    """
    From py-spy's raw (collapsed-stack) output: each function's share of the samples as the
    running frame (self) and anywhere on the stack (total).  Samples are of the busy thread
    only (py-spy leaves idle samples out), so the shares are shares of pgws's CPU time.
    """
    self_c: Counter[str] = Counter()
    total_c: Counter[str] = Counter()
    samples = 0
    for line in raw_path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        frames = [_short(f) for f in stack.split(";")]
        samples += k
        self_c[frames[-1]] += k
        for f in set(frames):
            total_c[f] += k
    packages: Counter[str] = Counter()
    for f, c in self_c.items():
        packages[_package(f)] += c
    boring = {f for f, c in total_c.items() if c >= 0.995 * samples}  # twistd's start-up frames
    total = [(f, c) for f, c in total_c.most_common() if f not in boring][:n + 10]
    return {
        "samples": samples,
        "self": [(f, c / samples) for f, c in self_c.most_common(n)] if samples else [],
        "total": [(f, c / samples) for f, c in total] if samples else [],
        "packages": [(p, c / samples) for p, c in packages.most_common()] if samples else [],
    }


def _package(frame: str) -> str:
    """The top-level package (or module) of a 'func (path/file.py)' frame."""
    where = frame.rpartition(" (")[2].rstrip(")")
    top = where.split("/", 1)[0]
    return top.removesuffix(".py") or "?"


def _short(frame: str) -> str:
    """'func (/long/path/site-packages/twisted/x.py)' -> 'func (twisted/x.py)'."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})" if where else name


def profile_lines(name: str, prof: dict[str, Any]) -> str:
    out = [f"{name}: {prof['samples']} samples",
           "  self (running)                                                  share"]
    for f, share in prof["self"]:
        out.append(f"    {f[:66]:66} {share * 100:5.1f}%")
    out.append("  self time by package: " + ", ".join(
        f"{p} {share * 100:.0f}%" for p, share in prof.get("packages", []) if share >= 0.005))
    out.append("  total (on the stack)")
    for f, share in prof["total"]:
        if share < 0.03:
            break
        out.append(f"    {f[:66]:66} {share * 100:5.1f}%")
    return "\n".join(out)
