"""Render-style frame ranges (DESIGN §2): ``"1-240x2"``, ``"1-10,20,30-40x5"``.

A task template such as ``blender -b scene.blend -s {start} -e {end} -a``
with ``frames`` and ``chunk`` expands into one task per chunk; this module
parses the ranges, cuts them into chunks and fills the placeholders, and
orders a stage's tasks for dispatch (``frame_order``).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MAX_FRAME",
    "MAX_FRAMES",
    "FrameChunk",
    "FrameRange",
    "FrameSpecError",
    "chunk_frames",
    "count_chunks",
    "dispatch_ids",
    "dispatch_order",
    "expand_template",
    "parse_frame_ranges",
    "parse_frames",
]

MAX_FRAMES = 1_000_000
"""The most frames one ``frames`` spec may name."""
MAX_FRAME = (1 << 31) - 1
"""The highest frame number: renderers take 32-bit frame numbers, so 0 <= frame < 2**31."""
_MAX_DIGITS = len(str(MAX_FRAME))


class FrameSpecError(ValueError):
    """A bad ``frames`` specification; ``offset`` is 0-based within the spec."""

    def __init__(self, message: str, offset: int = 0) -> None:
        super().__init__(message)
        self.offset = offset


# ------------------------------------------------------------------ frames


@dataclass(frozen=True)
class FrameRange:
    start: int
    end: int
    step: int = 1

    @property
    def frames(self) -> range:
        return range(self.start, self.end + 1, self.step)


@dataclass(frozen=True)
class FrameChunk:
    index: int
    start: int
    end: int
    step: int
    frames: list[int]


_ITEM_RE = re.compile(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*(?:x\s*([0-9]+)\s*)?)?", re.ASCII)


def _number(item: str, m: re.Match[str], group: int, pos: int) -> int:
    digits = m.group(group)
    # Checked on the digits first: int() of thousands of digits is slow (and refused).
    if len(digits.lstrip("0")) > _MAX_DIGITS or int(digits) > MAX_FRAME:
        what = "step" if group == 3 else "frame"
        raise FrameSpecError(
            f"{what} {digits[:20]}{'...' if len(digits) > 20 else ''} in {item.strip()[:40]!r} "
            f"is out of range (at most {MAX_FRAME})",
            pos + m.start(group),
        )
    return int(digits)


def parse_frame_ranges(spec: str) -> list[FrameRange]:
    """Parse ``"1-240x2"``, ``"1-10,20,30-40x5"`` into ranges.

    Raises :class:`FrameSpecError` (a ``ValueError``) on a malformed item, a
    frame or step above :data:`MAX_FRAME`, a reversed range, a zero step, a
    repeated frame, or more than :data:`MAX_FRAMES` frames. The count is
    arithmetic (nothing is expanded to be refused) and repeats are looked for
    only among items whose spans overlap.
    """
    if not isinstance(spec, str):
        raise FrameSpecError('frames must be a string such as "1-240x2"')
    if not spec.strip():
        raise FrameSpecError('frames is empty; expected e.g. "1-240", "1-240x2" or "1,5,10-20"')
    out: list[FrameRange] = []
    offsets: list[int] = []
    total = 0
    pos = 0
    for item in spec.split(","):
        m = _ITEM_RE.fullmatch(item)
        if m is None:
            lead = len(item) - len(item.lstrip())
            raise FrameSpecError(
                f"bad frame item {item.strip()[:40]!r}: expected N, A-B or A-BxS with "
                "whole numbers >= 0",
                pos + lead,
            )
        a = _number(item, m, 1, pos)
        b = a if m.group(2) is None else _number(item, m, 2, pos)
        step = 1 if m.group(3) is None else _number(item, m, 3, pos)
        if b < a:
            raise FrameSpecError(
                f"reversed frame range {a}-{b}: the first frame must not exceed the last",
                pos + m.start(1),
            )
        if step == 0:
            raise FrameSpecError(
                f"frame step is 0 in {item.strip()!r}; expected a step >= 1", pos + m.start(3)
            )
        r = FrameRange(a, b, step)
        total += len(r.frames)
        if total > MAX_FRAMES:
            raise FrameSpecError(f"too many frames (more than {MAX_FRAMES})", pos + m.start(1))
        out.append(r)
        offsets.append(pos + m.start(1))
        pos += len(item) + 1
    _refuse_repeats(out, offsets)
    return out


def _refuse_repeats(ranges: Sequence[FrameRange], offsets: Sequence[int]) -> None:
    """A frame named twice is an error; only items whose spans overlap can repeat one."""
    order = sorted(range(len(ranges)), key=lambda i: (ranges[i].start, i))
    group: list[int] = []
    group_end = -1
    for i in [*order, -1]:
        if i >= 0 and ranges[i].start <= group_end:
            group.append(i)
            group_end = max(group_end, ranges[i].frames[-1])
            continue
        if len(group) > 1:
            seen: set[int] = set()
            # in spec order, so the error names the later of the two items
            for j in sorted(group):
                for f in ranges[j].frames:
                    if f in seen:
                        raise FrameSpecError(f"frame {f} appears more than once", offsets[j])
                    seen.add(f)
        if i >= 0:
            group, group_end = [i], ranges[i].frames[-1]


def count_chunks(ranges: Sequence[FrameRange], chunk: int) -> int:
    """How many tasks :func:`chunk_frames` would make, without making them."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, not {chunk}")
    return sum(-(-len(r.frames) // chunk) for r in ranges)


def parse_frames(spec: str) -> list[int]:
    """Every frame a spec names, in the order given (see :func:`parse_frame_ranges`)."""
    return [f for r in parse_frame_ranges(spec) for f in r.frames]


def chunk_frames(ranges: Sequence[FrameRange], chunk: int) -> list[FrameChunk]:
    """Cut each range into chunks of ``chunk`` frames of its sequence."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, not {chunk}")
    out: list[FrameChunk] = []
    for r in ranges:
        frames = list(r.frames)
        for i in range(0, len(frames), chunk):
            part = frames[i : i + chunk]
            out.append(FrameChunk(len(out), part[0], part[-1], r.step, part))
    return out


_PLACEHOLDER_RE = re.compile(r"\{(start|end|step|frames|count|index)(?::([^{}]*))?\}")


def expand_template(template: str, chunk: FrameChunk) -> str:
    """Replace ``{start}``, ``{end}``, ``{step}``, ``{frames}``, ``{count}``,
    ``{index}`` (each with an optional format spec); leave other braces."""

    def sub(m: re.Match[str]) -> str:
        key, spec = m.group(1), m.group(2) or ""
        if key == "frames":
            return ",".join(format(f, spec) for f in chunk.frames)
        value = {
            "start": chunk.start,
            "end": chunk.end,
            "step": chunk.step,
            "count": len(chunk.frames),
            "index": chunk.index,
        }[key]
        return format(value, spec)

    return _PLACEHOLDER_RE.sub(sub, template)


# ------------------------------------------------------------------ dispatch order

FRAME_ORDERS = ("sequential", "first-last-middle")


def dispatch_order(n: int, order: str = "first-last-middle") -> list[int]:
    """The positions ``0..n-1`` of a stage's tasks in the order they should start.

    ``first-last-middle``: the first, the last, then the middle of every gap,
    breadth first (binary subdivision), so that a render shows its whole range
    early at ever finer resolution: 9 tasks go 0, 8, 4, 2, 6, 1, 3, 5, 7.
    """
    if order == "sequential" or n <= 2:
        return list(range(n))
    if order != "first-last-middle":
        raise ValueError(f"unknown frame order {order!r}; expected one of {FRAME_ORDERS}")
    out = [0, n - 1]
    gaps: deque[tuple[int, int]] = deque([(0, n - 1)])
    while gaps:
        lo, hi = gaps.popleft()
        if hi - lo < 2:
            continue
        mid = (lo + hi) // 2
        out.append(mid)
        gaps.append((lo, mid))
        gaps.append((mid, hi))
    return out


def dispatch_ids(ids: Sequence[int], sizes: Sequence[int], order: str) -> list[int]:
    """Give ascending ``ids`` (the claim's order) to a job's tasks by ``order``.

    ``sizes`` are the stages' task counts; the ids are handed out stage by
    stage. Returns the id of each task in submission order: with
    ``first-last-middle`` a stage's first task gets its lowest id, its last
    the next one, and so on, so the claim (``ORDER BY priority DESC, id``)
    dispatches them in that order while each task keeps its name and place.
    """
    if order == "sequential":
        return list(ids)
    if sum(sizes) != len(ids):
        raise ValueError(f"{len(ids)} ids for {sum(sizes)} tasks")
    out: list[int] = []
    pos = 0
    for size in sizes:
        block = ids[pos : pos + size]
        mine = [0] * size
        for rank, task in enumerate(dispatch_order(size, order)):
            mine[task] = block[rank]
        out.extend(mine)
        pos += size
    return out
