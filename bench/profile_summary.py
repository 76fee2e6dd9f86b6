"""Summarise a py-spy ``--format raw`` profile (collapsed stacks) as tables.

``python bench/profile_summary.py bench/results/profiles/<stamp>/api_single-postier.txt``
(or a ``.txt.gz`` of it)

For each thread: how busy it was, then where its busy samples were spent: by package, by
function including callees (a function counts once per stack), and by function alone
(self time). Idle samples (a thread waiting in ``select``/``epoll`` or on a lock or queue)
are counted apart, so that percentages are of the time the thread was really running.
"""

from __future__ import annotations

import argparse
import gzip
import re
from collections import Counter, defaultdict
from pathlib import Path

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_IDLE_LEAVES = ("select (selectors.py", "epoll", "poll (selectors.py",
                "wait (threading.py", "get (queue.py", "_wait_for_tstate_lock",
                "Condition.wait (threading.py", "Event.wait (threading.py",
                "Queue.get (queue.py", "select.epoll",
                # aiosqlite's thread waiting for its next call (SimpleQueue.get, in C)
                "_connection_worker_thread (aiosqlite/core.py:59)")


def _split_thread(frames: list[str]) -> tuple[str, list[str]]:
    """With ``--threads`` each stack starts with "thread (1234): MainThread"; without it
    (``--gil`` profiles) every sample is of the thread holding the GIL."""
    first = frames[0]
    if not first.startswith("thread ("):
        return "the thread holding the GIL", frames
    name = first.split(":", 1)[1].strip() if ":" in first else first
    return re.sub(r"Thread-\d+", "Thread-N", name), frames[1:]


def _package(file: str) -> str:
    parts = file.split("/")
    if file.startswith("<"):
        return "python (frozen)"
    top = parts[0]
    return top if len(parts) > 1 else f"python stdlib ({top})"


def summarise(path: Path, top: int, only: str | None) -> str:
    busy: dict[str, Counter[str]] = defaultdict(Counter)  # thread -> self func
    incl: dict[str, Counter[str]] = defaultdict(Counter)
    pkgs: dict[str, Counter[str]] = defaultdict(Counter)  # thread -> package (self)
    totals: Counter[str] = Counter()
    idle: Counter[str] = Counter()
    text = (gzip.decompress(path.read_bytes()).decode(errors="replace")
            if path.suffix == ".gz" else path.read_text(errors="replace"))
    for raw in text.splitlines():
        m = _LINE.match(raw)
        if not m:
            continue
        frames = m["stack"].split(";")
        count = int(m["count"])
        thread, stack = _split_thread(frames)
        if only and only not in thread:
            continue
        totals[thread] += count
        if not stack or any(stack[-1].startswith(p) or p in stack[-1] for p in _IDLE_LEAVES):
            idle[thread] += count
            continue
        seen: set[str] = set()
        for frame in stack:
            fm = _FRAME.match(frame)
            key = f"{fm['func']} ({fm['file']})" if fm else frame
            if key not in seen:
                seen.add(key)
                incl[thread][key] += count
        fm = _FRAME.match(stack[-1])
        leaf = f"{fm['func']} ({fm['file']}:{fm['line']})" if fm else stack[-1]
        busy[thread][leaf] += count
        pkgs[thread][_package(fm["file"]) if fm else "?"] += count
    out: list[str] = []
    for thread, total in totals.most_common():
        running = total - idle[thread]
        if running <= 0:
            continue
        busy_note = "" if thread.startswith("the thread") else f", busy {running / total:.0%}"
        out.append(f"\n## {thread}: {total} samples{busy_note}")
        out.append("\n### by package (self time, % of busy)")
        for name, n in pkgs[thread].most_common(top):
            out.append(f"{n / running:6.1%}  {name}")
        out.append("\n### by function including callees (% of busy)")
        for name, n in incl[thread].most_common(top):
            out.append(f"{n / running:6.1%}  {name}")
        out.append("\n### Postier's functions including callees (% of busy)")
        mine = [(k, n) for k, n in incl[thread].most_common() if "(postier/" in k]
        for name, n in mine[:top]:
            out.append(f"{n / running:6.1%}  {name}")
        out.append("\n### by function, self time (% of busy)")
        for name, n in busy[thread].most_common(top):
            out.append(f"{n / running:6.1%}  {name}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--thread", help="only threads whose name contains this")
    args = parser.parse_args()
    print(summarise(args.profile, args.top, args.thread))


if __name__ == "__main__":
    main()
