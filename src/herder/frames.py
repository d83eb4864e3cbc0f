"""Render-style frame ranges (DESIGN §2): ``"1-240x2"``, ``"1-10,20,30-40x5"``.

A task template such as ``blender -b scene.blend -s {start} -e {end} -a``
with ``frames`` and ``chunk`` expands into one task per chunk; this module
parses the ranges, cuts them into chunks and fills the placeholders.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

MAX_FRAMES = 1_000_000
"""The most frames one ``frames`` spec may name."""


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


def parse_frame_ranges(spec: str) -> list[FrameRange]:
    """Parse ``"1-240x2"``, ``"1-10,20,30-40x5"`` into ranges.

    Raises :class:`FrameSpecError` (a ``ValueError``) on a malformed item, a
    reversed range, a zero step, a repeated frame, or more than
    :data:`MAX_FRAMES` frames.
    """
    if not isinstance(spec, str):
        raise FrameSpecError('frames must be a string such as "1-240x2"')
    if not spec.strip():
        raise FrameSpecError('frames is empty; expected e.g. "1-240", "1-240x2" or "1,5,10-20"')
    out: list[FrameRange] = []
    total = 0
    seen: set[int] = set()
    pos = 0
    for item in spec.split(","):
        m = _ITEM_RE.fullmatch(item)
        if m is None:
            lead = len(item) - len(item.lstrip())
            raise FrameSpecError(
                f"bad frame item {item.strip()!r}: expected N, A-B or A-BxS with whole numbers >= 0",
                pos + lead,
            )
        a = int(m.group(1))
        b = a if m.group(2) is None else int(m.group(2))
        step = 1 if m.group(3) is None else int(m.group(3))
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
        for f in r.frames:
            if f in seen:
                raise FrameSpecError(f"frame {f} appears more than once", pos + m.start(1))
            seen.add(f)
        out.append(r)
        pos += len(item) + 1
    return out


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
