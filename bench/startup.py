#!/usr/bin/env python3
"""Start-up cost: `herder run` of a one-action Rakefile (`a:` / `remote-true`)
on the embedded farm (no --master), beside distcc compiling one tiny C file on
a distccd this script starts on loopback, `sh -c true` as the floor, and
`python -c "import sqlalchemy, pydantic, click"` (the libraries herder starts
on, with nothing of herder's own), all in the same run, repetitions interleaved.

Wall time and CPU (user+sys of the command and every descendant it waited
for: RUSAGE_CHILDREN deltas; the bench is a child subreaper, so orphans are
counted too). distcc's CPU adds what distccd spent on the compile (psutil on
its process tree); every distcc compile is checked to have run on distccd
(its COMPILE_OK log lines; DISTCC_FALLBACK=0, so no silent local compile).

herder is timed twice: in a fresh directory each time (creates .herder/ and
its database) and warm (the same directory again, .herder/ already there).
One untimed warm-up of each row comes first.

    python bench/startup.py [--reps 5]

Targets: herder <= 0.3 s wall, <= 0.4 s CPU (median).
"""

from __future__ import annotations

import argparse
import shutil
import sys

import _benchlib as bl

WALL_TARGET = 0.3
CPU_TARGET = 0.4


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per row (default 5)")
    ap.add_argument("--timeout", type=float, default=60.0, help="limit per command, s (default 60)")
    args = ap.parse_args()
    bl.setup_process()
    reps = max(1, args.reps)

    why = bl.herder_importable()
    if why:
        print(f"herder cannot start right now: {why}")
        return 1

    rows: dict[str, list[bl.Run]] = {}
    extra_cpu: dict[str, list[float]] = {}
    failures: list[str] = []
    distcc_missing = bl.Distccd.missing()
    remote_ok = 0
    distcc_runs = 0

    with bl.tempdir("herder-bench-startup-") as base:
        src = base / "c"
        src.mkdir()
        (src / "tiny.c").write_text("int tiny(void) { return 42; }\n")
        warm = base / "warm"
        bl.write_true_rakefile(warm, 1)

        def herder_fresh(i: int) -> bl.Run:
            d = base / f"fresh{i}"
            bl.write_true_rakefile(d, 1)
            r = bl.run_measured(bl.herder_cmd("run", "--plain"), d, timeout=args.timeout)
            if not r.ok or "build succeeded" not in r.stdout:
                failures.append(f"herder run (fresh dir): {r.failure()}\n{bl.herder_log_tail(d)}")
            shutil.rmtree(d, ignore_errors=True)
            return r

        def herder_warm(i: int) -> bl.Run:
            r = bl.run_measured(bl.herder_cmd("run", "--plain"), warm, timeout=args.timeout)
            if not r.ok or "build succeeded" not in r.stdout:
                failures.append(f"herder run (warm): {r.failure()}\n{bl.herder_log_tail(warm)}")
            return r

        def floor(i: int) -> bl.Run:
            return bl.run_measured(["sh", "-c", "true"], timeout=args.timeout)

        ctx = bl.Distccd(jobs=2) if not distcc_missing else None
        try:
            if ctx is not None:
                ctx.__enter__()

            def distcc(i: int) -> bl.Run:
                nonlocal remote_ok, distcc_runs
                assert ctx is not None
                (src / "tiny.o").unlink(missing_ok=True)
                before, cpu0 = ctx.compiles(), ctx.cpu()
                r = bl.run_measured(
                    ["distcc", "cc", "-c", "tiny.c", "-o", "tiny.o"],
                    src,
                    env=ctx.env(),
                    timeout=args.timeout,
                    keep=[ctx.pid],
                )
                server = ctx.cpu() - cpu0
                extra_cpu.setdefault("distcc", []).append(server)
                r.cpu += server
                distcc_runs += 1
                remote_ok += ctx.compiles() - before
                if not r.ok or not (src / "tiny.o").exists():
                    failures.append(f"distcc: {r.failure()}")
                return r

            def libraries(i: int) -> bl.Run:
                # What herder's own start cannot go below without other libraries:
                # the store's SQLAlchemy, the models' pydantic, the CLI's click.
                return bl.run_measured(
                    [sys.executable, "-c", "import sqlalchemy, pydantic, click"],
                    timeout=args.timeout,
                )

            plan = [("sh -c true", floor), ("libraries", libraries)]
            if ctx is not None:
                plan.append(("distcc", distcc))
            plan += [("herder fresh", herder_fresh), ("herder warm", herder_warm)]
            for _name, fn in plan:  # warm-up, untimed
                fn(-1)
            remote_ok = distcc_runs = 0
            extra_cpu.clear()
            for i in range(reps):
                for name, fn in plan:
                    rows.setdefault(name, []).append(fn(i))
        finally:
            if ctx is not None:
                ctx.__exit__()

    print(f"start-up: one action, {reps} repetitions each (interleaved), median / min")
    print(f"{'':34s} {'wall median':>11s} {'min':>7s}   {'CPU median':>10s} {'min':>7s}")

    def line(label: str, runs: list[bl.Run], note: str = "") -> tuple[float, float]:
        wm, wn = bl.med_min([r.wall for r in runs])
        cm, cn = bl.med_min([r.cpu for r in runs])
        print(f"{label:34s} {wm:9.3f} s {wn:7.3f}   {cm:8.3f} s {cn:7.3f}  {note}")
        return wm, cm

    floor_w, _floor_c = line("sh -c true (floor)", rows["sh -c true"])
    lib_w, lib_c = line("python: import sqlalchemy, pydantic, click", rows["libraries"])
    print(
        f"  (the libraries alone take {lib_w / WALL_TARGET:.0%} of the wall target, "
        f"{lib_c / CPU_TARGET:.0%} of the CPU target)"
    )
    distcc_w = distcc_c = None
    if "distcc" in rows:
        srv = sorted(extra_cpu.get("distcc", [0.0]))[len(extra_cpu.get("distcc", [0.0])) // 2]
        distcc_w, distcc_c = line(
            "distcc cc -c tiny.c -> distccd", rows["distcc"], f"(distccd part {srv:.3f} s)"
        )
        print(
            f"  distcc verified: {remote_ok}/{distcc_runs} timed compiles ran on distccd "
            f"127.0.0.1 (COMPILE_OK in its log; DISTCC_FALLBACK=0)"
        )
        if remote_ok != distcc_runs:
            failures.append(f"distcc: only {remote_ok} of {distcc_runs} compiles ran on distccd")
    else:
        print(f"distcc: SKIPPED, {distcc_missing}")
    for name, label in (
        ("herder fresh", "herder run (fresh dir)"),
        ("herder warm", "herder run (warm .herder/)"),
    ):
        w, c = line(label, rows[name])
        ratios = f"  ratio wall {w / floor_w:.0f}x floor"
        if distcc_w:
            assert distcc_c is not None
            ratios += (
                f", {w / distcc_w:.2f}x distcc wall, {c / max(distcc_c, 1e-9):.2f}x distcc CPU"
            )
        print(ratios)
        print(
            f"  target: wall <= {WALL_TARGET} s {bl.verdict(w, WALL_TARGET)}, "
            f"CPU <= {CPU_TARGET} s {bl.verdict(c, CPU_TARGET)}"
        )
    print(bl.load_note())
    stragglers = [s for runs in rows.values() for r in runs for s in r.stragglers]
    if stragglers:
        print(f"note: {len(stragglers)} process(es) outlived their command: {stragglers[:3]}")
    if failures:
        print(f"\n{len(failures)} run(s) FAILED; first:\n{failures[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
