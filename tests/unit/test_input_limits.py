"""The bounds of what the Rakefile and frame parsers accept (issue 11)."""

from __future__ import annotations

import pytest

from herder.frames import MAX_FRAME, FrameSpecError, parse_frame_ranges, parse_frames
from herder.rakefile import MAX_ACTIONS, MAX_SET_NAME, RakefileError, parse_rakefile


def test_frame_numbers_are_bounded() -> None:
    assert MAX_FRAME == 2**31 - 1
    assert parse_frames(f"{MAX_FRAME}") == [MAX_FRAME]
    for spec, offset in ((f"{MAX_FRAME + 1}", 0), (f"1-{2**63}", 2), (f"1-5x{2**64}", 4)):
        with pytest.raises(FrameSpecError, match="out of range") as ei:
            parse_frames(spec)
        assert ei.value.offset == offset


def test_thousands_of_digits_are_refused_not_converted() -> None:
    # int() refuses more than 4300 digits with a ValueError of its own: never reached
    with pytest.raises(FrameSpecError, match="out of range"):
        parse_frames("1" * 100_000)
    assert parse_frames("0" * 50 + "7") == [7]  # leading zeros are not magnitude


def test_repeats_found_among_overlapping_items_only() -> None:
    assert parse_frames("0-10x2,1-11x2") == [*range(0, 11, 2), *range(1, 12, 2)]
    with pytest.raises(FrameSpecError, match="frame 6 appears more than once") as ei:
        parse_frames("0-10x2,20,3-9x3")
    assert ei.value.offset == 10
    # far apart ranges of a million frames: no set of frames is built to tell
    assert len(parse_frame_ranges("0-499999,1000000-1499999")) == 2


def test_rakefile_actionset_limits() -> None:
    too_long = "n" * (MAX_SET_NAME + 1)
    with pytest.raises(RakefileError, match="at most 100") as ei:
        parse_rakefile(f"{too_long}:\n\techo\n")
    assert (ei.value.line, ei.value.col) == (1, 1)
    text = "a:\n" + "\techo\n" * (MAX_ACTIONS + 1)
    with pytest.raises(RakefileError, match=f"more than {MAX_ACTIONS} actions") as ei:
        parse_rakefile(text)
    assert (ei.value.line, ei.value.col) == (MAX_ACTIONS + 2, 2)
