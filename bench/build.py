#!/usr/bin/env python3
"""The sum-of-squares build (N=200) through `herder run` against `make -j2`
of an equivalent Makefile, in the same run, from the same clean sources.

Both compile 200 funcI.c and programN.c, link, and run the program. herder is
timed twice: embedded (its own master and agent start and stop inside the
figure, what a laptop user sees) and against an already running farm.

    python bench/build.py [--n 200] [--slots 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from herder.localfarm import LocalFarm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "sum-of-squares"))
from generate import generate  # noqa: E402


def makefile(n: int) -> str:
    objs = " ".join(f"func{i}.o" for i in range(1, n + 1))
    return (
        f"all: run\n"
        f"run: program{n}\n\t./program{n}\n"
        f"program{n}: program{n}.o {objs}\n\tcc -o program{n} program{n}.o {objs}\n"
        f"%.o: %.c\n\tcc -c $<\n"
        f".PHONY: all run\n"
    )


def fresh(n: int, base: Path, name: str) -> Path:
    d = base / name
    if d.exists():
        shutil.rmtree(d)
    generate(n, d)
    (d / "Makefile").write_text(makefile(n))
    return d


def timed(argv: list[str], cwd: Path) -> tuple[float, str]:
    env = dict(os.environ)
    env.pop("HERDER_MASTER", None)
    t0 = time.perf_counter()
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        log = cwd / ".herder" / "logs" / "master.log"
        tail = log.read_text(errors="replace")[-6000:] if log.exists() else ""
        sys.exit(f"{argv[:4]} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}\n{tail}")
    return elapsed, r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--slots", type=int, default=2)
    args = ap.parse_args()
    n = args.n
    expected = str(sum(i * i for i in range(1, n + 1)))
    herder = [sys.executable, "-m", "herder", "run", "--plain"]
    with tempfile.TemporaryDirectory(prefix="herder-bench-build-") as tmp:
        base = Path(tmp)
        make_s, out = timed(["make", f"-j{args.slots}", "-s"], fresh(n, base, "make"))
        assert expected in out, out[-500:]
        emb_s, out = timed([*herder, "--slots", str(args.slots)], fresh(n, base, "embedded"))
        assert expected in out, out[-500:]
        with LocalFarm(workdir=base / "farm-state") as farm:
            farm.start_master()
            farm.start_agent(slots=args.slots, name="bench")
            farm.wait_agents(1)
            farm_s, out = timed([*herder, "--master", farm.url], fresh(n, base, "farm"))
            assert expected in out, out[-500:]
    print(f"sum-of-squares N={n}: {n + 2} compile/link actions + 1 local run, {args.slots} slots")
    print(f"make -j{args.slots}:                 {make_s:7.3f} s")
    print(f"herder run (running farm):  {farm_s:7.3f} s   ratio {farm_s / make_s:.2f}x make")
    print(f"herder run (embedded farm): {emb_s:7.3f} s   ratio {emb_s / make_s:.2f}x make")


if __name__ == "__main__":
    main()
