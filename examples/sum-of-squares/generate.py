#!/usr/bin/env python3
"""Write the sum-of-squares build into DIR: funcI.c (each returns I*I) for I in
1..N, programN.c (prints the sum of funcI()), and a Rakefile that compiles
every funcI.c remotely, then programN.c, links them remotely, and runs
./programN locally.

    python generate.py N DIR
"""

from __future__ import annotations

import sys
from pathlib import Path


def generate(n: int, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i in range(1, n + 1):
        (out / f"func{i}.c").write_text(f"int func{i}(void) {{ return {i} * {i}; }}\n")
    decls = "".join(f"int func{i}(void);\n" for i in range(1, n + 1))
    calls = "".join(f"    sum += func{i}();\n" for i in range(1, n + 1))
    (out / f"program{n}.c").write_text(
        "#include <stdio.h>\n"
        f"{decls}"
        "int main(void) {\n"
        "    long sum = 0;\n"
        f"{calls}"
        '    printf("%ld\\n", sum);\n'
        "    return 0;\n"
        "}\n"
    )
    objs = " ".join(f"func{i}.o" for i in range(1, n + 1))
    lines = [
        f"# sum of squares of 1..{n}, built on a farm",
        "PORT = 6238",
        "HOSTS = localhost",
        "",
        "compile-functions:",
    ]
    for i in range(1, n + 1):
        lines += [f"\tremote-cc -c func{i}.c", f"\t\trequires func{i}.c"]
    lines += [
        "",
        "compile-program:",
        f"\tremote-cc -c program{n}.c   # the main program",
        f"\t\trequires program{n}.c",
        "",
        "link:",
        f"\tremote-cc -o program{n} program{n}.o {objs}",
        f"\t\trequires program{n}.o",
        f"\t\trequires {objs}",
        "",
        "run:",
        f"\t./program{n}",
        "",
    ]
    (out / "Rakefile").write_text("\n".join(lines))


def main() -> None:
    if len(sys.argv) != 3 or not sys.argv[1].isdigit() or int(sys.argv[1]) < 1:
        sys.exit("usage: generate.py N DIR   (N >= 1)")
    generate(int(sys.argv[1]), Path(sys.argv[2]))


if __name__ == "__main__":
    main()
