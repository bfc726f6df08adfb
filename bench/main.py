"""
`python -m bench`: start a throwaway PostgreSQL, run every scenario K times against a fresh pgws
(and the baselines against the same load generator), print a table of medians and the ratios
against the targets, write bench/results/<stamp>.json and .png, optionally profile pgws with
py-spy, and stop everything it started.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import datetime
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench import journal, report, scenarios, services
from bench.scenarios import Env, Params

RESULTS = Path(__file__).resolve().parent / "results"

FULL = Params(fanout=[1, 100, 1000, 10000], ceiling_readers=1000, warmup=2.0, duration=8.0,
              batch=50, payload_size=64, paced_readers=1000, paced_rate=100.0, paced_seconds=10.0,
              channels=1000, channel_readers=10, writers=100, connections=[1000, 10000],
              journal_readers=1000, producers=4, producer_batch=100, resume_messages=10_000,
              resume_rounds=3, metrics_readers=1000)
QUICK = Params(fanout=[1, 1000], ceiling_readers=1000, warmup=0.5, duration=2.0, batch=50,
               payload_size=64, paced_readers=1000, paced_rate=100.0, paced_seconds=3.0,
               channels=100, channel_readers=10, writers=20, connections=[1000, 2000],
               journal_readers=1000, producers=4, producer_batch=100, resume_messages=10_000,
               resume_rounds=3, metrics_readers=1000)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true",
                    help="small N and short runs, one run unless --runs is given (a smoke check)")
    ap.add_argument("--runs", type=int, default=None, help="runs per scenario; figures are "
                    "medians (default 3, or 1 with --quick)")
    ap.add_argument("--scenarios", default="all",
                    help="comma-separated: fanout, fanout-N, paced, channels, writers, "
                         "connections, pg-ceiling, stack-ceiling, paced-ceiling, pg-writers, "
                         "baselines, journal-fanout-N, journal-writers, producers, "
                         "journal-producers, journal-resume, journal (the journal scenarios "
                         "and their journal-off counterparts), metrics-off-fanout-N, "
                         "metrics-on-fanout-N, metrics (both: pgws's metrics off, then on and "
                         "scraped once a second), all")
    ap.add_argument("--profile", default=None,
                    help="scenarios to profile pgws in with py-spy after the runs, e.g. "
                         "fanout-1000,writers (default in a full run: fanout-1000, writers, "
                         "journal-fanout-1000, journal-writers; none with --quick; 'none' to "
                         "skip)")
    g = ap.add_argument_group("sizes (defaults: full run / --quick)")
    g.add_argument("--fanout", type=_ints, help="reader counts of the fanout scenario "
                   f"({FULL.fanout} / {QUICK.fanout})")
    g.add_argument("--ceiling-readers", type=int, help="readers of the stack ceiling (1000)")
    g.add_argument("--duration", type=float, help="measured seconds per run (8 / 2)")
    g.add_argument("--warmup", type=float, help="seconds of load before measuring (2 / 0.5)")
    g.add_argument("--batch", type=int, help="pg_notify per producer transaction (50)")
    g.add_argument("--payload-size", type=int, help="payload bytes (64; under 126)")
    g.add_argument("--paced-readers", type=int, help="readers of the paced scenario (1000)")
    g.add_argument("--paced-rate", type=float, help="notifications/s of the paced scenario (100)")
    g.add_argument("--paced-seconds", type=float, help="measured seconds of paced (10 / 3)")
    g.add_argument("--channels", type=int, help="channels of the channels scenario (1000 / 100)")
    g.add_argument("--channel-readers", type=int, help="readers per channel (10)")
    g.add_argument("--writers", type=int, help="writers (100 / 20)")
    g.add_argument("--connections", type=_ints,
                   help="idle connection steps (1000,10000 / 1000,2000)")
    g.add_argument("--journal-readers", type=int,
                   help="readers of journal-fanout-N and its fanout-N (1000)")
    g.add_argument("--producers", type=int,
                   help="producer processes of (journal-)producers, one channel each (4)")
    g.add_argument("--producer-batch", type=int,
                   help="calls per transaction of (journal-)producers and journal-resume (100)")
    g.add_argument("--resume-messages", type=int,
                   help="messages journal-resume's reader misses, then gets replayed (10000)")
    g.add_argument("--resume-rounds", type=int,
                   help="resumes per journal-resume run; the median counts (3)")
    g.add_argument("--metrics-readers", type=int,
                   help="readers (N) of metrics-off-fanout-N and metrics-on-fanout-N (1000)")
    ap.add_argument("--quiet-cores", type=float, default=0.3,
                    help="before each scenario run, wait until other processes use fewer cores "
                         "than this (0.3) ...")
    ap.add_argument("--quiet-wait", type=float, default=None,
                    help="... but at most this many seconds (20, or 3 with --quick; 0: never wait)")
    ap.add_argument("--noisy", type=float, default=None,
                    help="run a scenario again (once) when other processes took more than this "
                         "many cores during its window; the quieter run counts (0.4, or 0 = "
                         "never with --quick)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (bench/results)")
    return ap.parse_args(argv)


def make_params(args: argparse.Namespace) -> Params:
    """The --quick or full sizes, with those given on the command line instead."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Params)
             if getattr(args, f.name, None) is not None}
    params = dataclasses.replace(QUICK if args.quick else FULL, **given)
    if params.payload_size >= 126 or params.payload_size < 30:
        raise SystemExit("--payload-size must be 30..125")
    return params


def select(names: list[str], spec: str, params: Params) -> list[str]:
    if spec == "all":
        return names
    wanted: list[str] = []
    for word in (w.strip() for w in spec.split(",") if w.strip()):
        if word == "baselines":
            hits = [n for n in names if n.startswith(("pg-ceiling", "stack-ceiling", "paced-ceiling",
                                                          "pg-writers"))]
        elif word == "journal":
            pairs = journal.counterparts(params)
            hits = [n for n in names if n.startswith("journal-") or n in pairs]
        elif word == "metrics":
            hits = [n for n in names if n.startswith("metrics-")]
        elif word in ("fanout", "stack-ceiling"):
            hits = [n for n in names if n.startswith(word + "-")]
        elif word.startswith("fanout-") and word not in names:
            n = int(word.split("-", 1)[1])
            params.fanout.append(n)
            hits = [word]
        else:
            hits = [n for n in names if n == word]
        if not hits:
            raise SystemExit(f"unknown scenario {word!r}; known: {', '.join(names)}")
        wanted += [h for h in hits if h not in wanted]
    return wanted


def host_info() -> dict[str, Any]:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for mod in ("twisted", "autobahn", "txpostgres", "psycopg2", "jwt"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = "?"
    return {"cpus": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "kernel": platform.release(), "loadavg_at_start": os.getloadavg(), **versions,
            "git": git_state()}


def git_state() -> dict[str, Any]:
    """
    The commit, and pgws files changed in the working tree (others work in it): taken at the
    start and at the end of a run, since pgws may change while it runs.
    """
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"),
            "pgws_changed": git("status", "--porcelain", "--", "pgws").splitlines()}


def wait_quiet(limit: float, max_wait: float) -> tuple[float, float]:
    """
    The machine is shared: wait (at most max_wait seconds) until other processes use less than
    `limit` cores, measured over one second.  Returns (busy cores seen last, seconds waited).
    """
    t0 = time.time()
    while True:
        h0, w0 = services.host_busy(), time.time()
        time.sleep(1.0)
        busy = (services.host_busy() - h0) / (time.time() - w0)
        if busy <= limit or time.time() - t0 >= max_wait:
            return busy, time.time() - t0


def run_one(env: Env, name: str, fn: Any, quiet: tuple[float, float] | None = None) -> dict[str, Any]:
    busy, waited = wait_quiet(*quiet) if quiet else (None, 0.0)
    t0 = time.time()
    try:
        rec = fn(env)
    except Exception as e:
        rec = {"name": name, "error": f"{e.__class__.__name__}: {e}",
               "traceback": traceback.format_exc()}
    rec["name"] = name
    rec["seconds"] = time.time() - t0
    rec["busy_before"] = busy
    rec["waited_for_quiet"] = waited
    return rec


def brief(rec: dict[str, Any]) -> str:
    if "error" in rec:
        return f"ERROR {rec['error'].splitlines()[0][:300]}"
    parts = [f"{rec['value']:,.0f} {rec['unit']}" if rec.get("value") is not None else "-"]
    if rec.get("p99_ms") is not None:
        parts.append(f"p50 {rec['p50_ms']:.1f} / p99 {rec['p99_ms']:.1f} / max {rec['max_ms']:.0f} ms")
    parts.append(f"loadgen {rec['lg_cpu']:.2f} cores")
    if rec.get("srv_cpu") is not None:
        parts.append(f"server {rec['srv_cpu']:.2f} cores, {rec['srv_rss_mb']:.0f} MB")
    if rec.get("other_cpu") is not None:
        parts.append(f"PG {rec['pg_cpu']:.2f}, others {rec['other_cpu']:.2f} cores")
    if rec.get("drops"):
        parts.append(f"dropped {rec['drops']}")
    cut = rec.get("cut_off") or {}
    if cut.get("count"):
        before = rec.get("value_before_cut")
        parts.append(f"{cut['count']} readers cut off as too slow from {cut.get('first_s') or 0:.0f} s "
                     "after the load began" + (f" ({before:,.0f}/s before)" if before else ""))
    warn = rec.get("server_warnings") or {}
    if warn.get("count"):
        parts.append(f"pgws warnings {warn['count']}: {warn['first'][0][:120]}")
    if rec.get("scrapes") is not None:
        parts.append(scrape_brief(rec))
    if rec.get("steps"):
        parts.append("; ".join(f"{s['connections']}: {s['rss_per_conn_kb'] or 0:.1f} KB/conn"
                               for s in rec["steps"]) + f"; served {rec['served']}")
    return ", ".join(parts) + f" [{rec['seconds']:.0f} s]"


def scrape_brief(rec: dict[str, Any]) -> str:
    """The /metrics scrapes of a run in a few words."""
    answers = ", ".join(f"{k}: {v}" for k, v in sorted(
        {**rec.get("scrape_status", {}), **rec.get("scrape_errors", {})}.items()))
    text = f"/metrics scrapes {rec['scrape_ok']} of {rec['scrapes']} answered 200 ({answers})"
    if rec.get("scrape_ms_p50") is not None:
        text += (f", {rec['scrape_ms_p50']:.1f} / max {rec['scrape_ms_max']:.1f} ms, "
                 f"{rec['scrape_bytes_p50']:,.0f} / max {rec['scrape_bytes_max']:,.0f} bytes")
    return text


@dataclasses.dataclass
class Plan:
    """What this invocation runs, and where its results go (from the command line)."""

    params: Params
    quick: bool
    runs: int
    chosen: list[str]
    catalogue: dict[str, Any]
    profile: list[str]
    quiet: tuple[float, float] | None
    noisy: float
    stamp: str
    out_dir: Path
    git_at_start: dict[str, Any] = dataclasses.field(default_factory=dict)


def make_plan(args: argparse.Namespace) -> Plan:
    params = make_params(args)
    catalogue = dict(scenarios.catalogue(params))
    chosen = select(list(catalogue), args.scenarios, params)
    catalogue = dict(scenarios.catalogue(params))  # again: --scenarios fanout-N may add an N
    quiet_wait = args.quiet_wait if args.quiet_wait is not None else (3.0 if args.quick else 20.0)
    return Plan(
        params=params, quick=args.quick, chosen=chosen, catalogue=catalogue,
        runs=args.runs if args.runs is not None else (1 if args.quick else 3),
        profile=profiled(args, catalogue),
        quiet=(args.quiet_cores, quiet_wait) if quiet_wait > 0 else None,
        noisy=args.noisy if args.noisy is not None else (0.0 if args.quick else 0.4),
        stamp=datetime.datetime.now().strftime("%Y-%m-%d_%H%M%S") + ("-quick" if args.quick else ""),
        out_dir=args.out, git_at_start=git_state())


def profiled(args: argparse.Namespace, catalogue: dict[str, Any]) -> list[str]:
    """The scenarios --profile names (none if py-spy is missing)."""
    if args.profile is None:
        profile = [] if args.quick else ["fanout-1000", "writers", "journal-fanout-1000",
                                         "journal-writers"]
    elif args.profile == "none":
        profile = []
    else:
        profile = [p.strip() for p in args.profile.split(",") if p.strip()]
    py_spy = Path(sys.executable).parent / "py-spy"
    if profile and not py_spy.exists():
        print(f"note: {py_spy} not found (pip install py-spy); not profiling", flush=True)
        profile = []
    for p in profile:
        if p not in catalogue:
            raise SystemExit(f"cannot profile unknown scenario {p!r}")
    return profile


def make_env(pg: services.Postgres, workdir: Path, params: Params) -> Env:
    import jwt

    secret = secrets.token_hex(32)
    return Env(pg=pg, secret=secret, workdir=workdir, params=params,
               token_r=jwt.encode({"mode": "r"}, secret, algorithm="HS256"),
               token_w=jwt.encode({"mode": "w"}, secret, algorithm="HS256"))


def run_quietest(env: Env, name: str, fn: Any, plan: Plan, label: str) -> dict[str, Any]:
    """
    run_one; if other processes took more than plan.noisy cores during its window, once more,
    and the quieter run counts.
    """
    rec = run_one(env, name, fn, plan.quiet)
    if plan.noisy and (rec.get("other_cpu") or 0) > plan.noisy:
        print(f"{label} {name}: {brief(rec)} -- other processes took "
              f"{rec['other_cpu']:.2f} cores: running it again", flush=True)
        again = run_one(env, name, fn, plan.quiet)
        if (again.get("other_cpu") or 0) < rec["other_cpu"] or "error" in rec:
            again["noisy_first_try"] = {key: rec.get(key) for key in
                                        ("value", "p99_ms", "other_cpu")}
            rec = again
    return rec


def run_scenarios(env: Env, plan: Plan, records: list[dict[str, Any]]) -> None:
    """Every chosen scenario, plan.runs times; each record is appended as soon as it is done."""
    runs = plan.runs
    for k in range(runs):
        for name in plan.chosen:
            label = f"[run {k + 1}/{runs}]"
            rec = run_quietest(env, name, plan.catalogue[name], plan, label)
            rec["run"] = k + 1
            records.append(rec)
            print(f"{label} {name}: {brief(rec)}", flush=True)


def run_profiles(env: Env, plan: Plan, profiles: dict[str, Any]) -> None:
    """Each profiled scenario once with py-spy's raw output and once with a flame graph."""
    for name in plan.profile:
        for fmt, suffix in (("raw", "txt"), ("flamegraph", "svg")):
            path = plan.out_dir / f"{plan.stamp}-profile-{name}.{suffix}"
            env.profile = (fmt, path)
            rec = run_one(env, name, plan.catalogue[name], plan.quiet)
            env.profile = None
            print(f"[profile {fmt}] {name}: {brief(rec)} -> {path.name}", flush=True)
            if fmt == "raw" and path.exists():
                profiles[name] = report.top_functions(path)
                profiles[name]["file"] = path.name
                profiles[name]["record"] = {k: rec.get(k) for k in
                                            ("value", "unit", "srv_cpu", "lg_cpu")}
            elif fmt == "flamegraph" and name in profiles:
                profiles[name]["svg"] = path.name if path.exists() else None


def measure(plan: Plan, records: list[dict[str, Any]], profiles: dict[str, Any]) -> bool:
    """
    Start PostgreSQL, run the scenarios and the profiles, stop everything; returns whether it
    was interrupted (what was measured until then is in `records` and `profiles`).
    """
    workdir = Path(tempfile.mkdtemp(prefix="pgws-bench-"))
    pg = services.Postgres()
    try:
        print(f"pgws benchmark {plan.stamp}: {plan.runs} run(s) of {', '.join(plan.chosen)}",
              flush=True)
        print("starting the throwaway PostgreSQL ...", flush=True)
        pg.start()
        env = make_env(pg, workdir, plan.params)
        run_scenarios(env, plan, records)
        run_profiles(env, plan, profiles)
    except KeyboardInterrupt:
        print("interrupted: stopping everything", flush=True)
        return True
    finally:
        services.cleanup()
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return False


def write_results(plan: Plan, records: list[dict[str, Any]], profiles: dict[str, Any],
                  interrupted: bool, started: float) -> None:
    """The JSON file and the chart, then the table, the ratios and any problems on stdout."""
    summary = report.summarise(records)
    order = [n for n in plan.chosen if n in summary]
    rows = report.ratios(summary, plan.params)
    title = (f"pgws benchmark {plan.stamp} - medians of {plan.runs} run(s), {os.cpu_count()} "
             f"CPUs, loopback{' (quick)' if plan.quick else ''}")
    json_path = plan.out_dir / f"{plan.stamp}.json"
    png_path = plan.out_dir / f"{plan.stamp}.png"
    slim = [{k: v for k, v in r.items() if k != "hist"} for r in records]
    json_path.write_text(json.dumps({
        "stamp": plan.stamp, "quick": plan.quick, "runs": plan.runs, "interrupted": interrupted,
        "seconds": time.time() - started, "host": {**host_info(), "git_at_start": plan.git_at_start},
        "params": vars(plan.params),
        "scenarios": plan.chosen, "summary": summary, "targets": rows, "profiles": profiles,
        "records": slim,
    }, indent=1, default=str))
    if order:
        try:
            report.chart(summary, order, rows, png_path, title)
        except Exception as e:  # the table and the JSON matter more than the picture
            print(f"chart failed: {e}", flush=True)
    print()
    print(title)
    print(report.table(summary, order))
    print()
    print("targets (ratios measured in this run):")
    print(report.ratio_lines(rows))
    print_problems(records, profiles)
    print(f"\nwrote {json_path}" + (f" and {png_path}" if png_path.exists() else "")
          + f" in {time.time() - started:.0f} s")


def print_problems(records: list[dict[str, Any]], profiles: dict[str, Any]) -> None:
    """pgws's warnings, the profiles' top functions, and the failed runs' tracebacks."""
    warned = [(r["name"], r.get("run"), r["server_warnings"]) for r in records
              if (r.get("server_warnings") or {}).get("count")]
    if warned:
        print("\npgws logged warnings or errors in:")
        for name, run, w in warned:
            print(f"  {name} (run {run}): {w['count']} - " + " | ".join(x[:150] for x in w["first"]))
    for name, prof in profiles.items():
        print()
        print(report.profile_lines(f"py-spy profile of pgws under {name} ({prof['file']})", prof))
    for r in records:
        if "error" in r:
            print(f"\n{r['name']} (run {r.get('run')}) failed:\n{r.get('traceback', r['error'])}")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    plan = make_plan(parse_args(argv))
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)
    atexit.register(services.cleanup)
    started = time.time()
    records: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    interrupted = measure(plan, records, profiles)
    write_results(plan, records, profiles, interrupted, started)
    return 1 if interrupted else 0
