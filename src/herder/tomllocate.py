"""Where a key of a TOML job file is: a best-effort scan of the text (tomllib gives no positions)."""

from __future__ import annotations

import re

__all__ = ["KeyPath", "fmt_path", "locate_keys"]

KeyPath = tuple[str | int, ...]


def _key_parts(s: str) -> list[str] | None:
    """Split a TOML (dotted) key; ``None`` if it is not a simple key."""
    parts: list[str] = []
    for raw in re.findall(r"""\s*("[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*(?:\.|$)""", s):
        parts.append(raw[1:-1] if raw[:1] in "\"'" else raw)
    return parts or None


def locate_keys(text: str) -> dict[KeyPath, tuple[int, int]]:
    """Best-effort map from key path to (line, col) by scanning the text.

    Understands ``[table]``, ``[[array]]`` headers and ``key = value`` lines,
    which is what job files are made of; anything fancier is simply not
    located.
    """
    where: dict[KeyPath, tuple[int, int]] = {}
    counters: dict[tuple[str, ...], int] = {}
    context: KeyPath = ()
    # No two parts of a pattern may match the same characters: "[" and 20,000
    # spaces took hours (cubic backtracking) with `\s*([^\]]+?)\s*\]`.
    header_re = re.compile(r"\s*(\[\[?)([^\]]*)\]\]?\s*(?:#.*)?$")
    key_re = re.compile(
        r"(\s*)((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*="
    )
    in_multiline = False
    for lineno, line in enumerate(text.splitlines(), start=1):
        # skip the body of multi-line strings (counting the delimiters is enough here)
        n = line.count('"""') + line.count("'''")
        if in_multiline:
            if n % 2 == 1:
                in_multiline = False
            continue
        h = header_re.match(line)
        if h is not None:
            names = _key_parts(h.group(2).strip())
            if names is None:
                continue
            is_array = h.group(1) == "[["
            tup = tuple(names)
            if is_array:
                counters[tup] = counters.get(tup, -1) + 1
                for k in [k for k in counters if len(k) > len(tup) and k[: len(tup)] == tup]:
                    del counters[k]
            ctx: list[str | int] = []
            for i in range(len(names)):
                ctx.append(names[i])
                pre = tuple(names[: i + 1])
                if pre in counters:
                    ctx.append(counters[pre])
            context = tuple(ctx)
            where.setdefault(context, (lineno, len(line) - len(line.lstrip()) + 1))
            continue
        km = key_re.match(line)
        if km is not None:
            names = _key_parts(km.group(2))
            if names is not None:
                where.setdefault((*context, *names), (lineno, len(km.group(1)) + 1))
            if n % 2 == 1:
                in_multiline = True
    return where


def fmt_path(path: KeyPath) -> str:
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            bare = re.fullmatch(r"[A-Za-z0-9_-]+", p) is not None
            out += ("." if out else "") + (p if bare else repr(p))
    return out
