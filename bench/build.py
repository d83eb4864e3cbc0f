#!/usr/bin/env python3
"""The sum-of-squares build (N=200) four ways, in the same run, each from the
same fresh sources: `make -j2`, `make -j2 CC="distcc cc"` against a distccd
this script starts on 127.0.0.1 (2 jobs), `herder run` on the embedded farm
(its own master and agent start and stop inside the figure, what a laptop
user sees), and `herder run --master URL` against a farm already running (one
master, one agent with 2 slots, herder.localfarm.LocalFarm); and `herder run
--direct --hosts 127.0.0.2:PORT` against one agent serving only direct work
(`herder agent --direct-listen`, 2 slots, no master: DESIGN §9), its CPU added.

All compile N funcI.c and programN.c, link, and run the program (its output
is checked). CPU is user+sys of the command and every descendant it waited
for (RUSAGE_CHILDREN deltas); distcc adds distccd's CPU and --master adds the
running farm's (psutil on their process trees). distcc must really compile on
distccd: DISTCC_FALLBACK=0 (a failure to reach it fails the build) and its
COMPILE_OK log lines are counted.

    python bench/build.py [--n 200] [--slots 2] [--reps 1]

Targets: embedded <= 1.1x make and within 15% of distcc; --master <= 1.3x make.
Without distcc (run `make bench` / scripts/ensure-bench-deps.sh) that row is
skipped, and says so.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _benchlib as bl

sys.path.insert(0, str(bl.ROOT / "examples" / "sum-of-squares"))
from generate import generate


def makefile(n: int) -> str:
    objs = " ".join(f"func{i}.o" for i in range(1, n + 1))
    return (
        f"CC = cc\n"
        f"all: run\n"
        f"run: program{n}\n\t./program{n}\n"
        f"program{n}: program{n}.o {objs}\n\t$(CC) -o program{n} program{n}.o {objs}\n"
        f"%.o: %.c\n\t$(CC) -c $<\n"
        f".PHONY: all run\n"
    )


def fresh(n: int, base: Path, name: str) -> Path:
    d = base / name
    if d.exists():
        shutil.rmtree(d)
    generate(n, d)
    (d / "Makefile").write_text(makefile(n))
    return d


@dataclass
class Row:
    label: str
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    server_cpus: list[float] = field(default_factory=list)
    note: str = ""
    error: str = ""

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpus)

    @property
    def done(self) -> bool:
        return bool(self.walls) and not self.error


def _direct_agent(state: Path, slots: int) -> tuple[Any, str]:
    """One agent serving only direct work on 127.0.0.2 (started, answering)."""
    import os
    import time

    import httpx

    from herder.localfarm import Proc, free_port

    state.mkdir(parents=True, exist_ok=True)
    addr = f"127.0.0.2:{free_port('127.0.0.2')}"
    argv = [sys.executable, "-m", "herder", "agent", "--direct-listen", addr]
    argv += ["--slots", str(slots), "--state-dir", str(state), "--log-level", "warning"]
    proc = Proc(argv, state / "agent.log", dict(os.environ))
    proc.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://{addr}/direct/cost", timeout=1).status_code == 200:
                return proc, addr
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.stop()
    raise SystemExit(f"direct agent on {addr} did not start:\n{proc.log_text()[-2000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=200, help="functions to compile (default 200)")
    ap.add_argument("--slots", type=int, default=2, help="parallelism of every row (default 2)")
    ap.add_argument("--reps", type=int, default=1, help="rounds, interleaved; median (default 1)")
    ap.add_argument("--timeout", type=float, default=600.0, help="limit per build, s (default 600)")
    args = ap.parse_args()
    bl.setup_process()
    n, slots = args.n, args.slots
    expected = str(sum(i * i for i in range(1, n + 1)))

    why = bl.herder_importable()
    if why:
        print(f"herder cannot start right now: {why}")
        return 1
    from herder.localfarm import LocalFarm

    make = Row(f"make -j{slots}")
    distcc = Row(f'make -j{slots} CC="distcc cc"')
    emb = Row("herder run (embedded farm)")
    farm_row = Row("herder run --master (running farm)")
    direct_row = Row("herder run --direct (direct agent)")
    distcc_missing = bl.Distccd.missing()
    if distcc_missing:
        distcc.error = f"SKIPPED: {distcc_missing}"
    herder_run = bl.herder_cmd("run", "--plain")
    remote = 0

    def check(row: Row, r: bl.Run, d: Path) -> bool:
        if r.ok and expected in r.stdout:
            return True
        row.error = f"FAILED: {r.failure()}\n{bl.herder_log_tail(d)}"
        return False

    with bl.tempdir("herder-bench-build-") as base:
        dcc = bl.Distccd(jobs=slots) if not distcc_missing else None
        farm = LocalFarm(workdir=base / "farm-state")
        direct_agent, direct_addr = _direct_agent(base / "direct-state", slots)
        try:
            bl.register_helper(direct_agent.pid)
            if dcc is not None:
                dcc.__enter__()
            farm.start_master()
            farm.start_agent(slots=slots, name="bench")
            farm.wait_agents(1)
            farm_pids = [p.pid for p in (farm.master, *farm.agents) if p is not None]
            for pid in farm_pids:
                bl.register_helper(pid)
            for _ in range(max(1, args.reps)):
                d = fresh(n, base, "make")
                r = bl.run_measured(["make", f"-j{slots}", "-s"], d, timeout=args.timeout)
                if check(make, r, d):
                    make.walls.append(r.wall)
                    make.cpus.append(r.cpu)

                if dcc is not None and not distcc.error:
                    d = fresh(n, base, "distcc")
                    before, cpu0 = dcc.compiles(), dcc.cpu()
                    r = bl.run_measured(
                        ["make", f"-j{slots}", "-s", "CC=distcc cc"],
                        d,
                        env=dcc.env(),
                        timeout=args.timeout,
                    )
                    server = dcc.cpu() - cpu0
                    got = dcc.compiles() - before
                    remote = got
                    if check(distcc, r, d):
                        if got != n + 1:
                            distcc.error = f"FAILED: {got} of {n + 1} compiles ran on distccd"
                        distcc.walls.append(r.wall)
                        distcc.cpus.append(r.cpu + server)
                        distcc.server_cpus.append(server)

                d = fresh(n, base, "embedded")
                r = bl.run_measured([*herder_run, "--slots", str(slots)], d, timeout=args.timeout)
                if check(emb, r, d):
                    emb.walls.append(r.wall)
                    emb.cpus.append(r.cpu)

                d = fresh(n, base, "farm")
                cpu0 = sum(bl.tree_cpu(p) for p in farm_pids)
                r = bl.run_measured([*herder_run, "--master", farm.url], d, timeout=args.timeout)
                server = sum(bl.tree_cpu(p) for p in farm_pids) - cpu0
                if check(farm_row, r, d):
                    farm_row.walls.append(r.wall)
                    farm_row.cpus.append(r.cpu + server)
                    farm_row.server_cpus.append(server)

                d = fresh(n, base, "direct")
                cpu0 = bl.tree_cpu(direct_agent.pid)
                r = bl.run_measured(
                    [*herder_run, "--direct", "--hosts", direct_addr], d, timeout=args.timeout
                )
                server = bl.tree_cpu(direct_agent.pid) - cpu0
                if check(direct_row, r, d):
                    direct_row.walls.append(r.wall)
                    direct_row.cpus.append(r.cpu + server)
                    direct_row.server_cpus.append(server)
        finally:
            bl.unregister_helper(direct_agent.pid)
            direct_agent.stop()
            for p in (farm.master, *farm.agents):
                if p is not None:
                    bl.unregister_helper(p.pid)
            farm.close(at_once=True)
            if dcc is not None:
                dcc.__exit__()

    print(
        f"sum-of-squares N={n}: {n + 1} compiles + 1 link + 1 local run, {slots} slots, "
        f"{max(1, args.reps)} round(s) (median)"
    )
    print(f"{'':38s} {'wall':>9s}  {'x make':>6s}  {'CPU':>8s}")
    for row in (make, distcc, emb, farm_row, direct_row):
        if not row.done:
            print(f"{row.label:38s} {row.error.splitlines()[0] if row.error else 'no data'}")
            continue
        ratio = f"{row.wall / make.wall:5.2f}x" if make.done else "    - "
        extra = ""
        if row.server_cpus:
            srv = statistics.median(row.server_cpus)
            who = {id(distcc): "distccd", id(direct_row): "agent"}.get(id(row), "farm")
            extra = f"  (client {row.cpu - srv:.2f} s + {who} {srv:.2f} s)"
        print(f"{row.label:38s} {row.wall:7.3f} s  {ratio}  {row.cpu:6.2f} s{extra}")
        if len(row.walls) > 1:
            print(f"{'':38s} rounds: {', '.join(f'{w:.2f}' for w in row.walls)} s")
    if distcc.done:
        print(
            f"  distcc verified: {remote} of {n + 1} compiles ran on distccd 127.0.0.1 "
            f"(COMPILE_OK lines in its log; DISTCC_FALLBACK=0); the link ran locally"
        )
    print("targets:")
    if emb.done and make.done:
        r = emb.wall / make.wall
        print(f"  embedded <= 1.10x make:        {r:5.2f}x  {bl.verdict(r, 1.10)}")
    if emb.done and distcc.done:
        r = emb.wall / distcc.wall
        print(f"  embedded within 15% of distcc: {r:5.2f}x  {bl.verdict(r, 1.15)}")
    elif distcc_missing:
        print("  embedded vs distcc: not measured (distcc missing)")
    if farm_row.done and make.done:
        r = farm_row.wall / make.wall
        print(f"  --master <= 1.30x make:        {r:5.2f}x  {bl.verdict(r, 1.30)}")
    if direct_row.done and make.done:
        r = direct_row.wall / make.wall
        print(f"  --direct vs make (no target):  {r:5.2f}x")
    print(bl.load_note())
    errors = [
        row for row in (make, distcc, emb, farm_row, direct_row) if row.error.startswith("FAILED")
    ]
    for row in errors:
        print(f"\n{row.label} {row.error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
