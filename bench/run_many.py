#!/usr/bin/env python3
"""`herder run` of many remote `true` actions (a generated Rakefile: one
actionset of N `remote-true` lines) on the embedded farm, against
`xargs -P2 true` on the same count, in the same run.

The herder figure is the whole command, what a user waits for: the embedded
farm's start and stop, submit, N actions, and the build's own report (the
"in X s" figure herder prints is shown beside it). xargs runs before and
after herder; the faster of the two is the baseline. CPU is user+sys of each
command and its descendants (RUSAGE_CHILDREN deltas).

    python bench/run_many.py [--actions 4000] [--slots 2]
"""

from __future__ import annotations

import argparse
import re
import sys

import _benchlib as bl


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--actions", type=int, default=4000, help="remote-true actions (default 4000)")
    ap.add_argument("--slots", type=int, default=2, help="agent slots / xargs -P (default 2)")
    ap.add_argument("--timeout", type=float, default=900.0, help="limit per row, s (default 900)")
    args = ap.parse_args()
    bl.setup_process()
    n, slots = args.actions, args.slots

    why = bl.herder_importable()
    if why:
        print(f"herder cannot start right now: {why}")
        return 1

    xargs = [bl.xargs_true(n, slots, args.timeout)]
    with bl.tempdir("herder-bench-run-many-") as base:
        d = base / "build"
        bl.write_true_rakefile(d, n)
        r = bl.run_measured(
            bl.herder_cmd("run", "--plain", "--slots", str(slots)),
            d,
            timeout=args.timeout,
            stdout_path=base / "out.txt",
        )
        out = (base / "out.txt").read_text(errors="replace")
        logs = bl.herder_log_tail(d)
    xargs.append(bl.xargs_true(n, slots, args.timeout))
    for x in xargs:
        if not x.ok:
            print(f"xargs failed: {x.failure()}", file=sys.stderr)
            return 1
    xargs_s = min(x.wall for x in xargs)
    xargs_rate = n / xargs_s
    print(f"herder run: {n} remote `true` actions in one actionset, embedded farm, {slots} slots")
    print(
        f"xargs -P{slots}:          {xargs_s:8.3f} s  {xargs_rate:8.1f} actions/s  "
        f"CPU {xargs[0].cpu:6.2f} s  (runs: {', '.join(f'{x.wall:.3f}' for x in xargs)} s)"
    )
    m = re.search(r"build succeeded: (\d+) action\(s\).* ([\d.]+)s\s*$", out, re.M)
    if not r.ok or m is None:
        r.stdout = out
        print(f"herder run:          FAILED\n{r.failure()}\n{logs}", file=sys.stderr)
        print("herder run:          FAILED (see stderr)")
        return 1
    rate = n / r.wall
    print(
        f"herder run:          {r.wall:8.3f} s  {rate:8.1f} actions/s  CPU {r.cpu:6.2f} s  "
        f"ratio {rate / xargs_rate:.3f}x xargs  (herder's own report: {m.group(2)} s)"
    )
    print(
        f"CPU per action: herder {r.cpu * 1000 / n:.2f} ms, xargs {xargs[0].cpu * 1000 / n:.2f} ms"
    )
    print(bl.load_note())
    if r.stragglers:
        print(f"note: {len(r.stragglers)} process(es) outlived herder run: {r.stragglers[:3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
