#!/usr/bin/env python3
"""Memory of a big build: `herder run` of a generated Rakefile of 100,000
actions (one actionset of `remote-true` lines) on the embedded farm. The
memory of the `herder run` process and all its descendants (the commands;
master and agent run inside it) is summed every 0.2 s (psutil); the peak
total is printed, with the split by process at that moment, and the rate
(actions/s), beside `xargs -P2 true` on the same count, in the same run.

The sum is of PSS (proportional set size: a page shared by k processes counts
1/k in each); a command caught between fork and exec (still herder's command
line) is counted as nothing: Python spawns with vfork, so until exec it runs
in herder's own address space, and its PSS would count herder a second time.
The peak RSS of `herder run` alone is printed too.

    python bench/memory.py [--actions 100000] [--slots 2] [--timeout 2400]

Target: peak total memory (PSS as above) < 300 MB.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import _benchlib as bl

TARGET_MB = 300.0


def _role(cmdline: list[str]) -> str:
    text = " ".join(cmdline)
    for role in ("master", "agent", "run"):
        if f"herder {role}" in text:
            return f"herder {role}"
    return cmdline[0].rsplit("/", 1)[-1] if cmdline else "?"


def sample(pid: int) -> tuple[int, dict[str, int]]:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, {}
    split: dict[str, int] = {}
    own: list[str] = []
    with contextlib.suppress(psutil.Error):
        own = root.cmdline()
    for p in procs:
        with contextlib.suppress(psutil.Error):
            cmdline = p.cmdline() if p.pid != pid else own
            if p.pid != pid and own and cmdline == own:
                # A command's process between fork and exec: Python spawns with
                # vfork, so it runs in herder's own address space, whose pages its
                # PSS would count a second time in full. Nothing of its own yet.
                continue
            info = p.memory_full_info()
            mem = int(getattr(info, "pss", info.rss))
            role = _role(cmdline) if p.pid != pid else "herder run"
            if p.pid == pid:
                split["herder run (RSS)"] = int(info.rss)
            split[role] = split.get(role, 0) + mem
    rss_only = split.pop("herder run (RSS)", 0)
    total = sum(split.values())
    split["herder run (RSS)"] = rss_only
    return total, split


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--actions", type=int, default=100_000, help="actions (default 100000)")
    ap.add_argument("--slots", type=int, default=2, help="agent slots / xargs -P (default 2)")
    ap.add_argument("--interval", type=float, default=0.2, help="sampling period, s (default 0.2)")
    ap.add_argument(
        "--timeout", type=float, default=2400.0, help="limit for herder run, s (default 2400)"
    )
    args = ap.parse_args()
    bl.setup_process()
    n, slots = args.actions, args.slots

    why = bl.herder_importable()
    if why:
        print(f"herder cannot start right now: {why}")
        return 1

    peak, peak_split, samples = 0, {}, 0
    timed_out = False
    with bl.tempdir("herder-bench-memory-") as base:
        d = base / "build"
        bl.write_true_rakefile(d, n)
        out_path = base / "out.txt"
        cpu0 = bl.children_cpu()
        with open(out_path, "wb") as out, open(base / "err.txt", "wb") as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                bl.herder_cmd("run", "--plain", "--slots", str(slots)),
                cwd=d,
                env=bl.bench_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
            try:
                while proc.poll() is None:
                    total, split = sample(proc.pid)
                    samples += 1
                    if total > peak:
                        peak, peak_split = total, split
                    if time.perf_counter() - t0 > args.timeout:
                        timed_out = True
                        break
                    time.sleep(args.interval)
            finally:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                wall = time.perf_counter() - t0
        stragglers = bl.settle_stragglers(grace=5.0)
        cpu = bl.children_cpu() - cpu0
        text = out_path.read_text(errors="replace")
        errtext = (base / "err.txt").read_text(errors="replace")
        logs = bl.herder_log_tail(d)
    done = len(re.findall(r"^-- .* ok in ", text, re.M))
    ok = proc.returncode == 0 and "build succeeded" in text
    xargs = bl.xargs_true(n, slots, timeout=args.timeout)

    print(f"herder run: {n} remote `true` actions, embedded farm, {slots} slots")
    mb = peak / 1e6
    print(
        f"peak total PSS (herder run with its farm + commands): {mb:7.1f} MB  "
        f"(target < {TARGET_MB:.0f} MB: {bl.verdict(mb, TARGET_MB - 1e-9)}; {samples} samples)"
    )
    if peak_split:
        print(
            "  at the peak: "
            + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(peak_split.items()))
        )
    xargs_rate = n / xargs.wall if xargs.ok else None
    if xargs_rate is not None:
        print(f"xargs -P{slots}:  {xargs.wall:8.3f} s  {xargs_rate:8.1f} actions/s")
    else:
        print(f"xargs -P{slots}: FAILED {xargs.failure()}")
    if ok:
        rate = n / wall
        ratio = f"  ratio {rate / xargs_rate:.3f}x xargs" if xargs_rate else ""
        print(f"herder run: {wall:8.3f} s  {rate:8.1f} actions/s  CPU {cpu:.1f} s{ratio}")
    else:
        what = f"timed out after {args.timeout:.0f} s" if timed_out else f"exit {proc.returncode}"
        rate = done / wall if wall else 0.0
        print(
            f"herder run: {what}: {done} of {n} actions done in {wall:.1f} s "
            f"({rate:.1f} actions/s so far); the peak above is of that part"
        )
        print(f"{text[-1500:]}\n{errtext[-2000:]}\n{logs}", file=sys.stderr)
    print(bl.load_note())
    if stragglers:
        print(f"note: {len(stragglers)} process(es) outlived herder run: {stragglers[:3]}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
