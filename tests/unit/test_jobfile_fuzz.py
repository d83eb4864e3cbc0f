"""Property tests of the TOML and JSON job-file parsers and the frame-range parser (issue 11):
for any input nothing escapes but the project's own error, and every error is located."""

from __future__ import annotations

import json
import os
import re
import time
import tracemalloc
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from herder.frames import (
    MAX_FRAME,
    MAX_FRAMES,
    FrameSpecError,
    chunk_frames,
    count_chunks,
    parse_frame_ranges,
)
from herder.inputs import BadEncoding, decode_utf8
from herder.jobfile import JobFileError, parse_jobfile, to_job_submit
from herder.jsonjob import parse_json_job
from herder.tomllocate import locate_keys

FUZZ = settings(
    max_examples=int(os.environ.get("HERDER_FUZZ_EXAMPLES", "300")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
LOCATED = re.compile(r"^(?P<path>job\.(?:toml|json)):(?P<line>\d+):(?P<col>\d+): .+$")


def _located(e: JobFileError, text: str, path: str) -> None:
    s = str(e)
    assert "\n" not in s
    m = LOCATED.match(s)
    assert m is not None, s
    assert m.group("path") == path
    line, col = int(m.group("line")), int(m.group("col"))
    assert (line, col) == (e.line, e.col)
    assert 1 <= line <= text.count("\n") + 1, s
    assert col >= 1


def toml_or_error(text: str) -> None:
    try:
        job = parse_jobfile(text)
    except JobFileError as e:
        _located(e, text, "job.toml")
        return
    assert job.stages and all(s.tasks for s in job.stages)
    to_job_submit(job, {p: "0" * 64 for p in job.required_paths()})


def json_or_error(text: str) -> None:
    try:
        parse_json_job(text, "job.json")
    except JobFileError as e:
        _located(e, text, "job.json")


# ------------------------------------------------------------------ TOML


@FUZZ
@given(st.text())
def test_toml_any_text(text: str) -> None:
    toml_or_error(text)


@FUZZ
@given(st.binary())
def test_toml_any_bytes(data: bytes) -> None:
    try:
        text = decode_utf8(data)
    except BadEncoding as e:
        assert e.line >= 1 and e.col >= 1
        return
    toml_or_error(text)


_frames = st.one_of(
    st.from_regex(r"\A[0-9x, -]{0,20}\Z"),
    st.builds(
        lambda a, b, s: f"{a}-{b}x{s}",
        st.integers(0, 2**70),
        st.integers(0, 2**70),
        st.integers(0, 2**40),
    ),
    st.sampled_from(["1-1000000", "0-2147483647", "1-100000x1,5", "1-3,2", "1,2,3"]),
)
_value = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.text(max_size=8).map(json.dumps),  # a TOML basic string is a JSON string
    st.sampled_from(["true", "[]", "{}", '["a", 1]', '"{start:q}"', '"a\\u001b[31m"', "1.5"]),
    _frames.map(json.dumps),
)
_key = st.sampled_from(
    ["name", "command", "frames", "chunk", "requires", "outputs", "priority", "pool", "owner",
     "cpus", "ram_mb", "timeout_s", "max_attempts", "tags", "env", "placement", "x", "idempotency_key"]
)  # fmt: skip
_header = st.sampled_from(
    ["[[stage]]", "[[stage.task]]", "[[stage.frames]]", "[defaults]", "[stage.task.env]", "[x]"]
)
_toml_line = st.one_of(_header, st.builds(lambda k, v: f"{k} = {v}", _key, _value))


@FUZZ
@given(st.lists(_toml_line, max_size=16))
def test_toml_near_valid(lines: list[str]) -> None:
    toml_or_error("\n".join(lines))


@FUZZ
@given(_frames, st.integers(-3, 2**40))
def test_toml_frame_templates(frames: str, chunk: int) -> None:
    text = (
        '[[stage]]\nname = "s"\n[[stage.frames]]\ncommand = "r {start} {end:04d}"\n'
        f"frames = {json.dumps(frames)}\nchunk = {chunk}\n"
    )
    toml_or_error(text)


def test_too_many_tasks_refused_without_expanding() -> None:
    text = '[[stage]]\nname = "s"\n[[stage.frames]]\ncommand = "r {start}"\nframes = "0-999999"\n'
    tracemalloc.start()
    try:
        try:
            parse_jobfile(text)
        except JobFileError as e:
            err = e
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "at most 100000" in err.message and (err.line, err.col) == (3, 1)
    assert peak < 2_000_000, peak  # a million tasks (or frames) would take hundreds of MB


# ------------------------------------------------------------------ JSON


@FUZZ
@given(st.text())
def test_json_any_text(text: str) -> None:
    json_or_error(text)


_json = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True),
        st.text(max_size=6),
        st.sampled_from(["x", "a\x1b[31m", "\x00", "s", "../x", "/abs", "0" * 64]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.sampled_from(
                [
                    "name",
                    "stages",
                    "tasks",
                    "command",
                    "requires",
                    "path",
                    "digest",
                    "cpus",
                    "priority",
                    "pool",
                    "tags",
                    "env",
                    "blobs",
                    "x",
                    "outputs",
                    "mode",
                ]
            ),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=20,
)


def _job_like(draw: st.DrawFn) -> Any:
    task = draw(
        st.fixed_dictionaries(
            {"command": st.one_of(st.just("x"), _json)},
            optional={"name": _json, "cpus": _json, "requires": _json, "tags": _json},
        )
    )
    stage = draw(st.fixed_dictionaries({"name": st.one_of(st.just("s"), _json)}))
    stage["tasks"] = draw(st.one_of(st.just([task]), _json))
    job = draw(
        st.fixed_dictionaries(
            {"name": st.one_of(st.just("j"), _json)}, optional={"priority": _json}
        )
    )
    job["stages"] = draw(st.one_of(st.just([stage]), _json))
    return job


@FUZZ
@given(st.composite(_job_like)(), st.booleans())
def test_json_near_valid(job: Any, indent: bool) -> None:
    json_or_error(json.dumps(job, indent=2 if indent else None))


# ------------------------------------------------------------------ frames


@FUZZ
@given(st.one_of(st.text(max_size=30), _frames))
def test_frames_any_text(spec: str) -> None:
    try:
        ranges = parse_frame_ranges(spec)
    except FrameSpecError as e:
        assert 0 <= e.offset <= len(spec), (e.offset, spec)
        assert "\n" not in str(e)
        return
    total = 0
    for r in ranges:
        assert 0 <= r.start <= r.end <= MAX_FRAME and r.step >= 1
        total += len(r.frames)
    assert total <= MAX_FRAMES


@FUZZ
@given(
    st.lists(
        st.tuples(st.integers(0, 60), st.integers(0, 30), st.integers(1, 7)), min_size=1, max_size=5
    ),
    st.integers(1, 9),
)
def test_frames_counted_without_expanding_match_expansion(
    items: list[tuple[int, int, int]], chunk: int
) -> None:
    spec = ",".join(f"{a}-{a + n}x{s}" for a, n, s in items)
    try:
        ranges = parse_frame_ranges(spec)
    except FrameSpecError as e:
        assert "more than once" in str(e)
        frames = [f for a, n, s in items for f in range(a, a + n + 1, s)]
        assert len(set(frames)) < len(frames)  # only a real repeat is refused
        return
    frames = [f for r in ranges for f in r.frames]
    assert len(set(frames)) == len(frames)
    assert count_chunks(ranges, chunk) == len(chunk_frames(ranges, chunk))


# ------------------------------------------------------------------ key locations


@FUZZ
@given(st.text(alphabet=st.sampled_from(list("[]. \t=#\"'ab-_\n")), max_size=200))
def test_locate_keys_any_text(text: str) -> None:
    lines = text.splitlines()
    for _path, (line, col) in locate_keys(text).items():
        assert 1 <= line <= len(lines) and 1 <= col <= len(lines[line - 1]) + 1


def test_locating_a_key_is_linear_in_the_line() -> None:
    # A line of "[" and 20,000 spaces (valid inside a multi-line array) took
    # hours to scan before the error naming `cpus` could be printed.
    for line in ("[" + " " * 20_000, "[a" + " " * 20_000 + "b", "a . " * 5_000, '"' * 20_000):
        text = f'name = "j"\nx = [\n{line}\n]]\n' if line[0] == "[" else f"{line}\n"
        text += '[[stage]]\nname = "s"\n[[stage.task]]\ncommand = "x"\ncpus = -1\n'
        started = time.perf_counter()
        toml_or_error(text)
        assert time.perf_counter() - started < 10, line[:10]  # quadratic took hours
