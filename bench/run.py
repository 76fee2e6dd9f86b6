"""Postier's benchmarks: ``make bench`` or ``.venv/bin/python bench/run.py [options]``.

Each scenario (a module in ``bench/scenarios/``) measures Postier and its baselines in the
same run, alternately, for several rounds; the table shows each system's median and its
spread (min–max), and the ratios the project tracks. Results go to
``bench/results/<timestamp>.json`` and ``bench/results/latest.json``. See
``docs/performance.md`` for what is measured and why.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness import (
    BENCH_DIR,
    BenchError,
    Context,
    Measurement,
    Scenario,
    dump_json,
    log,
    machine,
    summary,
    wait_for_quiet,
)
from scenarios import available

RESULTS = BENCH_DIR / "results"
PASSED_ENV = ("POSTIER_RELAY_CONCURRENCY", "POSTIER_CLAIM_BATCH", "POSTIER_POLL_INTERVAL")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    names = list(available())
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Benchmark Postier against baselines measured in the same run.",
    )
    p.add_argument("--scenario", action="append", metavar="NAME",
                   help=f"run only this scenario (repeatable; one of {', '.join(names)})")
    p.add_argument("--rounds", type=int, help="measurements per system (default 3; 1 with "
                   "--quick)")
    p.add_argument("--quick", action="store_true",
                   help="a fast smoke run: small counts, one round")
    p.add_argument("--profile", action="store_true",
                   help="record py-spy profiles of the Postier server (first round; the "
                   "numbers of that round are then slower) into bench/results/profiles/")
    p.add_argument("--python-sink", action="store_true",
                   help="use bench/pysink.py instead of Postfix's smtp-sink")
    p.add_argument("--quiet-wait", type=float, default=10.0, metavar="SECONDS",
                   help="before each measurement, wait up to this long for the machine to be "
                   "idle (default 10; 0 to not check)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    p.add_argument("--keep", action="store_true", help="keep the temporary data directories")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = p.parse_args(argv)
    if args.scenario:
        unknown = [s for s in args.scenario if s not in names]
        if unknown:
            p.error(f"unknown scenario {', '.join(unknown)}; choose among {', '.join(names)}")
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def run_scenario(cls: type[Scenario], ctx: Context) -> dict[str, Any]:
    scenario = cls(ctx)
    out: dict[str, Any] = {"description": cls.description, "params": {}, "systems": {},
                           "order": [], "ratios": [], "error": None}
    t0 = time.monotonic()
    try:
        log(f"{cls.name}: preparing")
        scenario.prepare()
        out["params"] = scenario.params
        systems = scenario.systems()
        rounds: dict[str, list[Measurement | None]] = {s.label: [] for s in systems}
        errors: dict[str, list[str]] = {s.label: [] for s in systems}
        for r in range(ctx.rounds):
            shift = r % len(systems)
            order = systems[shift:] + systems[:shift]  # nobody always goes first
            out["order"].append([s.label for s in order])
            for system in order:
                log(f"{cls.name}: round {r + 1}/{ctx.rounds}, {system.label}")
                before = wait_for_quiet(ctx.quiet_wait) if ctx.quiet_wait else None
                try:
                    m = system.measure(r)
                except BenchError as exc:
                    log(f"{cls.name}: {system.label} failed: {exc}")
                    rounds[system.label].append(None)
                    errors[system.label].append(str(exc))
                    continue
                if before is not None:
                    m.extra["busy_cores_before"] = before
                    if before > 0.3:
                        m.notes.append("machine busy before")
                rounds[system.label].append(m)
                log(f"{cls.name}: {system.label}: {m.throughput:,.0f} msg/s"
                    + (f" ({'; '.join(m.notes)})" if m.notes else ""))
        for system in systems:
            out["systems"][system.label] = _summarise(system.kind, system.description,
                                                      rounds[system.label],
                                                      errors[system.label])
        out["ratios"] = [_ratio(ratio, rounds) for ratio in scenario.ratios()]
    except BenchError as exc:
        log(f"{cls.name}: {exc}")
        out["error"] = str(exc)
    finally:
        scenario.close()
        out["duration_s"] = round(time.monotonic() - t0, 1)
    return out


def _summarise(kind: str, description: str, ms: list[Measurement | None],
               errors: list[str]) -> dict[str, Any]:
    done = [m for m in ms if m is not None]
    result: dict[str, Any] = {"kind": kind, "description": description, "rounds": ms,
                              "errors": errors}
    if done:
        result["throughput"] = summary([m.throughput for m in done])
        keys = sorted({k for m in done for k in m.extra})
        result["extra"] = {k: summary([m.extra[k] for m in done if k in m.extra])
                           for k in keys}
        counts = Counter(n for m in done for n in m.notes)
        result["notes"] = [n if k == 1 else f"{n} ({k} rounds)" for n, k in sorted(counts.items())]
    return result


def _ratio(ratio: Any, rounds: dict[str, list[Measurement | None]]) -> dict[str, Any]:
    num, den = rounds.get(ratio.numerator, []), rounds.get(ratio.denominator, [])
    out: dict[str, Any] = {"label": ratio.label, "numerator": ratio.numerator,
                           "denominator": ratio.denominator, "target": ratio.target}
    nums = [m.throughput for m in num if m is not None]
    dens = [m.throughput for m in den if m is not None]
    if not nums or not dens:
        out["value"] = None
        return out
    out["value"] = statistics.median(nums) / statistics.median(dens)
    pairs = [a.throughput / b.throughput for a, b in zip(num, den, strict=False)
             if a is not None and b is not None and b.throughput]
    if pairs:
        out["per_round"] = {"min": min(pairs), "max": max(pairs)}
    if ratio.target is not None:
        out["met"] = out["value"] >= ratio.target
    return out


# -- the table -------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None or value != value:
        return "—"
    return f"{value:,.{digits}f}"


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, sc in results["scenarios"].items():
        if sc.get("error"):
            rows.append([name, "—", "failed", "", "", "", "", "", "", sc["error"].splitlines()[0]])
            continue
        for label, sys_ in sc["systems"].items():
            if "throughput" not in sys_:
                rows.append([name, label, "failed", "", "", "", "", "", "",
                             (sys_["errors"] or ["?"])[0].splitlines()[0]])
                continue
            t, ex = sys_["throughput"], sys_.get("extra", {})
            cpu = ex.get("server_cpu_cores") or ex.get("cpu_cores")
            per_msg = ex.get("server_cpu_us_per_msg") or ex.get("cpu_us_per_msg")
            other = ex.get("other_cpu_cores")
            rows.append([
                name, label, _fmt(t["median"]), f"{_fmt(t['min'])}–{_fmt(t['max'])}",
                _fmt(ex["p50_ms"]["median"], 1) if "p50_ms" in ex else "—",
                _fmt(ex["p99_ms"]["median"], 1) if "p99_ms" in ex else "—",
                _fmt(cpu["median"], 2) if cpu else "—",
                _fmt(per_msg["median"]) if per_msg else "—",
                _fmt(other["max"], 2) if other else "—",
                "; ".join(sys_.get("notes", []))[:80],
            ])
    return rows


HEADER = ["scenario", "system", "msg/s (median)", "min–max", "p50 ms", "p99 ms",
          "CPU cores", "CPU µs/msg", "other CPU (max)", "notes"]


def ratio_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for name, sc in results["scenarios"].items():
        for r in sc.get("ratios", []):
            if r.get("value") is None:
                lines.append(f"{name}: {r['label']}: not measured")
                continue
            spread = r.get("per_round")
            text = f"{name}: {r['label']} = {r['value']:.2f}"
            if spread:
                text += f" (per round {spread['min']:.2f}–{spread['max']:.2f})"
            if r.get("target") is not None:
                text += f", target ≥ {r['target']:.2f}: {'met' if r['met'] else 'NOT met'}"
            lines.append(text)
    return lines


def print_report(results: dict[str, Any]) -> None:
    m = results["machine"]
    title = (f"Postier benchmarks, {results['options']['rounds']} round(s) — {m['cpu']}, "
             f"{m['cores']} cores, {m['ram_gib']} GiB, Python {m['python']}, "
             f"SQLite {m['sqlite']}")
    rows = table_rows(results)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
        for row in [HEADER, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        for line in ratio_lines(results):
            print(line)
        return
    table = Table(title=title, title_justify="left")
    for i, h in enumerate(HEADER):
        table.add_column(h, justify="right" if 2 <= i <= 8 else "left")
    for row in rows:
        table.add_row(*row)
    console = Console() if sys.stdout.isatty() else Console(width=170)
    console.print(table)
    for line in ratio_lines(results):
        console.print(line, highlight=False)


# -- main ------------------------------------------------------------------------------------


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (a timeout, systemd) stops like Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Every process a scenario started (servers, sinks, a Postfix instance) is stopped in
    # its ``finally``/``close``: make SIGTERM take that road too.
    signal.signal(signal.SIGTERM, _interrupt)
    scenarios = available()
    if args.list:
        for name, cls in scenarios.items():
            print(f"{name:12} {cls.description}")
        return 0
    chosen = [name for name in scenarios if not args.scenario or name in args.scenario]
    workdir = Path(tempfile.mkdtemp(prefix="postier-bench-"))
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    profile_dir = args.out / "profiles" / stamp if args.profile else None
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    ctx = Context(workdir=workdir, quick=args.quick, rounds=args.rounds,
                  profile_dir=profile_dir, env=env, python_sink=args.python_sink,
                  quiet_wait=args.quiet_wait)
    results: dict[str, Any] = {
        "version": 1,
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "options": {"rounds": args.rounds, "quick": args.quick, "profile": args.profile,
                    "quiet_wait": args.quiet_wait, "scenarios": chosen},
        "env": env,
        "machine": machine(),
        "load_average_at_start": os.getloadavg(),
        "scenarios": {},
    }
    log(f"work directory {workdir}")
    try:
        for name in chosen:
            results["scenarios"][name] = run_scenario(scenarios[name], ctx)
    except KeyboardInterrupt:
        log("interrupted: writing what was measured")
    finally:
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    finished = datetime.now(UTC)
    results["finished"] = finished.isoformat(timespec="seconds")
    results["duration_s"] = round((finished - started).total_seconds(), 1)
    results["load_average_at_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stamp}.json"
    dump_json(path, results)
    if not args.profile:  # a profiled run's figures are slower: not the latest results
        with contextlib.suppress(OSError):
            shutil.copyfile(path, args.out / "latest.json")
    print_report(results)
    print(f"results: {path}" + (f"; profiles: {profile_dir}" if profile_dir else ""))
    failed = any(sc.get("error") or any("throughput" not in s for s in sc["systems"].values())
                 for sc in results["scenarios"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
