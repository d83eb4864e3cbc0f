"""TOML job files and frame ranges (DESIGN §2, §3)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from herder.jobfile import (
    MAX_FRAMES,
    FrameChunk,
    FrameRange,
    FrameSpecError,
    JobFile,
    JobFileError,
    MissingDigestError,
    chunk_frames,
    expand_template,
    load_jobfile,
    parse_frame_ranges,
    parse_frames,
    parse_jobfile,
    to_job_submit,
)

RENDER = """\
name = "shot-010"
priority = 10
pool = "render"
owner = "alice"
idempotency_key = "shot-010-v3"

[defaults]
tags = ["blender"]
max_attempts = 3
env = { OCIO = "/studio/ocio.cfg", LEVEL = "1" }

[[stage]]
name = "prepare"

[[stage.task]]
command = "python bake.py"
requires = ["bake.py", "./assets/scene.blend"]
placement = "local"
env = { LEVEL = "2" }

[[stage.task]]
name = "argv"
command = ["echo", "hi"]
tags = []
max_attempts = 1
timeout_s = 30
cpus = 2
ram_mb = 512
outputs = ["out/a.txt"]

[[stage]]
name = "render"

[[stage.frames]]
command = "blender -b assets/scene.blend -s {start} -e {end} -j {step} -a"
frames = "1-9x2"
chunk = 2
requires = ["assets/scene.blend"]
outputs = ["out/{start:04d}"]
env = { FRAMES = "{frames}" }
cpus = 8
"""


def jerr(text: str) -> JobFileError:
    with pytest.raises(JobFileError) as ei:
        parse_jobfile(text)
    return ei.value


# ------------------------------------------------------------------ frames


@pytest.mark.parametrize(
    ("spec", "frames"),
    [
        ("1", [1]),
        ("0", [0]),
        ("1-5", [1, 2, 3, 4, 5]),
        ("1-10x3", [1, 4, 7, 10]),
        ("1-240x2", list(range(1, 241, 2))),
        ("1-10,20,30-40x5", [*range(1, 11), 20, 30, 35, 40]),
        (" 3 - 4 , 7 ", [3, 4, 7]),
        ("5-5", [5]),
        ("5-5x9", [5]),
        ("1-4x10", [1]),
        ("10,1-3", [10, 1, 2, 3]),
    ],
)
def test_parse_frames(spec: str, frames: list[int]) -> None:
    assert parse_frames(spec) == frames


@pytest.mark.parametrize(
    ("spec", "fragment", "offset"),
    [
        ("10-1", "reversed frame range 10-1", 0),
        ("1-3,9-2", "reversed", 4),
        ("1-10x0", "step is 0", 5),
        ("", "empty", 0),
        ("   ", "empty", 0),
        ("1,,2", "bad frame item", 2),
        ("a-b", "bad frame item", 0),
        ("-5", "bad frame item", 0),
        ("1-", "bad frame item", 0),
        ("1-5x", "bad frame item", 0),
        ("1.5", "bad frame item", 0),
        ("1-5,3", "frame 3 appears more than once", 4),
        ("1-2000000", "too many frames", 0),
        ("\u0661-\u0663", "bad frame item", 0),
    ],
)
def test_parse_frames_errors(spec: str, fragment: str, offset: int) -> None:
    with pytest.raises(FrameSpecError, match=fragment) as ei:
        parse_frames(spec)
    assert ei.value.offset == offset
    assert isinstance(ei.value, ValueError)


def test_max_frames_exact() -> None:
    assert len(parse_frames(f"1-{MAX_FRAMES}")) == MAX_FRAMES


def test_parse_frame_ranges() -> None:
    assert parse_frame_ranges("1-10,20,30-40x5") == [
        FrameRange(1, 10, 1),
        FrameRange(20, 20, 1),
        FrameRange(30, 40, 5),
    ]


def test_chunk_with_step() -> None:
    chunks = chunk_frames(parse_frame_ranges("1-240x2"), 10)
    assert len(chunks) == 12
    assert chunks[0] == FrameChunk(0, 1, 19, 2, list(range(1, 20, 2)))
    assert chunks[-1] == FrameChunk(11, 221, 239, 2, list(range(221, 240, 2)))


def test_chunk_never_spans_items_and_uneven_tail() -> None:
    chunks = chunk_frames(parse_frame_ranges("1-5,20,30-40x5"), 2)
    assert [(c.start, c.end, c.step) for c in chunks] == [
        (1, 2, 1),
        (3, 4, 1),
        (5, 5, 1),
        (20, 20, 1),
        (30, 35, 5),
        (40, 40, 5),
    ]
    assert [c.index for c in chunks] == list(range(6))


def test_chunk_larger_than_range_and_single_frame() -> None:
    assert chunk_frames(parse_frame_ranges("1-5"), 100) == [FrameChunk(0, 1, 5, 1, [1, 2, 3, 4, 5])]
    assert chunk_frames(parse_frame_ranges("7"), 10) == [FrameChunk(0, 7, 7, 1, [7])]


def test_chunk_zero_rejected() -> None:
    with pytest.raises(ValueError):
        chunk_frames([FrameRange(1, 2)], 0)


def test_expand_template() -> None:
    c = FrameChunk(3, 10, 14, 2, [10, 12, 14])
    assert expand_template("-s {start} -e {end} -j {step}", c) == "-s 10 -e 14 -j 2"
    assert expand_template("{frames} {count} {index}", c) == "10,12,14 3 3"
    assert expand_template("f_{start:04d} {frames:03d}", c) == "f_0010 010,012,014"
    # other braces are the shell's
    assert (
        expand_template("awk '{print $1}' ${HOME} {start", c) == "awk '{print $1}' ${HOME} {start"
    )


# ------------------------------------------------------------------ job files


def test_render_job() -> None:
    job = parse_jobfile(RENDER, "shot.toml")
    assert (job.name, job.priority, job.pool, job.owner, job.idempotency_key) == (
        "shot-010",
        10,
        "render",
        "alice",
        "shot-010-v3",
    )
    assert [s.name for s in job.stages] == ["prepare", "render"]
    bake, argv = job.stages[0].tasks
    assert bake.command == "python bake.py"
    assert bake.placement == "local"
    assert bake.requires == ["bake.py", "assets/scene.blend"]
    assert bake.tags == ["blender"] and bake.max_attempts == 3
    assert bake.env == {"OCIO": "/studio/ocio.cfg", "LEVEL": "2"}
    assert argv.name == "argv"
    assert argv.command == ["echo", "hi"]
    assert (argv.tags, argv.max_attempts, argv.timeout_s, argv.cpus, argv.ram_mb) == (
        [],
        1,
        30.0,
        2,
        512,
    )
    assert argv.outputs == ["out/a.txt"]

    frames = job.stages[1].tasks
    assert [t.name for t in frames] == ["render[1-3]", "render[5-7]", "render[9]"]
    assert frames[0].command == "blender -b assets/scene.blend -s 1 -e 3 -j 2 -a"
    assert frames[2].command == "blender -b assets/scene.blend -s 9 -e 9 -j 2 -a"
    assert frames[1].outputs == ["out/0005"]
    assert frames[1].env["FRAMES"] == "5,7"
    assert frames[1].env["OCIO"] == "/studio/ocio.cfg"
    assert frames[1].frames == [5, 7]
    assert frames[0].cpus == 8 and frames[0].tags == ["blender"]
    assert job.required_paths() == ["bake.py", "assets/scene.blend"]


def test_frames_defaults_and_argv_template() -> None:
    job = parse_jobfile(
        'name = "r"\n[[stage]]\nname = "s"\n[[stage.frames]]\nname = "beauty"\n'
        'command = ["render", "--frame={start}"]\nframes = "4,2"\n'
    )
    tasks = job.stages[0].tasks
    assert [t.name for t in tasks] == ["beauty[4]", "beauty[2]"]
    assert [t.command for t in tasks] == [["render", "--frame=4"], ["render", "--frame=2"]]


def test_tasks_before_frames_and_minimal_defaults(tmp_path: Path) -> None:
    p = tmp_path / "nightly.toml"
    p.write_text(
        '[[stage]]\nname = "s"\n[[stage.frames]]\ncommand = "r {start}"\nframes = "1"\n'
        '[[stage.task]]\ncommand = "first"\n'
    )
    job = load_jobfile(p)
    assert job.name == "nightly"
    assert job.path == str(p)
    assert (job.priority, job.pool, job.owner, job.idempotency_key) == (0, "default", None, None)
    assert [t.command for t in job.stages[0].tasks] == ["first", "r 1"]
    t = job.stages[0].tasks[0]
    assert (
        t.placement,
        t.requires,
        t.outputs,
        t.env,
        t.timeout_s,
        t.max_attempts,
        t.cpus,
        t.ram_mb,
    ) == ("remote", [], None, {}, None, 1, 1, 0)


def test_to_job_submit() -> None:
    job = parse_jobfile(RENDER)
    d = {"bake.py": "a" * 64, "assets/scene.blend": "b" * 64}
    sub = to_job_submit(job, d, modes={"bake.py": 0o755})
    assert sub.name == "shot-010" and sub.priority == 10 and sub.pool == "render"
    assert sub.owner == "alice" and sub.idempotency_key == "shot-010-v3"
    t0 = sub.stages[0].tasks[0]
    assert [(r.path, r.digest, r.mode) for r in t0.requires] == [
        ("bake.py", "a" * 64, 0o755),
        ("assets/scene.blend", "b" * 64, None),
    ]
    assert t0.placement == "local"
    assert sub.stages[1].tasks[0].name == "render[1-3]"
    assert sub.stages[1].tasks[0].cpus == 8
    with pytest.raises(MissingDigestError, match=r"bake\.py"):
        to_job_submit(job, {})


def test_load_bad_utf8(tmp_path: Path) -> None:
    p = tmp_path / "j.toml"
    p.write_bytes(b'name = "x"\n# caf\xc3\xa9 \xfe\n')
    with pytest.raises(JobFileError) as ei:
        load_jobfile(p)
    assert (ei.value.line, ei.value.col) == (2, 8)
    assert str(ei.value).startswith(f"{p}:2:8: invalid UTF-8")


# ------------------------------------------------------------------ errors


def test_toml_syntax_error_position() -> None:
    e = jerr('name = "x"\n[[stage]\n')
    assert (e.line, e.col) == (2, 8)
    assert str(e) == f"job.toml:2:8: {e.message}"
    assert "\n" not in str(e)
    assert str(pickle.loads(pickle.dumps(e))) == str(e)


def test_toml_error_at_end_of_document() -> None:
    e = jerr('name = "x"\npool = ')
    assert (e.line, e.col) == (2, 8)
    assert "end of file" in e.message


VALID_STAGE = '[[stage]]\nname = "s"\n[[stage.task]]\ncommand = "true"\n'


@pytest.mark.parametrize(
    ("text", "line", "key", "fragment"),
    [
        # unknown keys, located
        ('nmae = "x"\n' + VALID_STAGE, 1, "nmae", "unknown key 'nmae' in the job"),
        (
            '[[stage]]\nname = "s"\n[[stage.task]]\ncommand = "x"\n\n[[stage.task]]\ncomand = "y"\n',
            7,
            "stage[0].task[1].comand",
            "unknown key 'comand'",
        ),
        (
            VALID_STAGE + '[[stage]]\nname = "t"\ncolor = 1\n[[stage.task]]\ncommand = "y"\n',
            7,
            "stage[1].color",
            "unknown key 'color' in a [[stage]]",
        ),
        (
            '[defaults]\ncommand = "x"\n' + VALID_STAGE,
            2,
            "defaults.command",
            "unknown key 'command' in [defaults]",
        ),
        (
            '[[stage]]\nname = "s"\n[[stage.frames]]\ncommand = "x"\nframes = "1"\nchunks = 2\n',
            6,
            "stage[0].frames[0].chunks",
            "unknown key 'chunks'",
        ),
        # top-level values
        ('name = ""\n' + VALID_STAGE, 1, "name", "must not be empty"),
        ("name = 5\n" + VALID_STAGE, 1, "name", "expected a string, got an integer"),
        ("priority = 5000\n" + VALID_STAGE, 1, "priority", "out of range (-1000..1000)"),
        ("priority = true\n" + VALID_STAGE, 1, "priority", "expected an integer, got a boolean"),
        ('owner = ["a"]\n' + VALID_STAGE, 1, "owner", "expected a string"),
        ("stage = 1\n", 1, "stage", "expected an array of tables"),
        ("[stage]\nname = 's'\n", 1, "stage", "expected an array of tables"),
        # stages
        ('[[stage]]\n[[stage.task]]\ncommand = "x"\n', 1, "stage[0]", "needs a 'name'"),
        ('[[stage]]\nname = "s"\n', 1, "stage[0]", "'s' has no tasks"),
        # tasks
        (
            '[[stage]]\nname = "s"\n[[stage.task]]\ntags = []\n',
            3,
            "stage[0].task[0]",
            "needs a 'command'",
        ),
        (
            '[[stage]]\nname = "s"\n[[stage.task]]\ncommand = "  "\n',
            4,
            "stage[0].task[0].command",
            "empty",
        ),
        (
            '[[stage]]\nname = "s"\n[[stage.task]]\ncommand = []\n',
            4,
            "stage[0].task[0].command",
            "non-empty first",
        ),
        (
            '[[stage]]\nname = "s"\n[[stage.task]]\ncommand = ["a", 1]\n',
            4,
            "stage[0].task[0].command[1]",
            "expected a string",
        ),
        (
            '[[stage]]\nname = "s"\n[[stage.task]]\ncommand = "x"\nplacement = "gpu"\n',
            5,
            "stage[0].task[0].placement",
            '"remote" or "local"',
        ),
        (
            '[[stage]]\nname = "s"\n[[stage.task]]\ncommand = "x"\nrequires = ["../etc"]\n',
            5,
            "stage[0].task[0].requires[0]",
            "'..'",
        ),
        (
            '[[stage]]\nname = "s"\n[[stage.task]]\ncommand = "x"\nrequires = "a.c"\n',
            5,
            "stage[0].task[0].requires",
            "expected an array of strings",
        ),
        (
            '[[stage]]\nname = "s"\n[[stage.task]]\ncommand = "x"\noutputs = ["/abs"]\n',
            5,
            "stage[0].task[0].outputs[0]",
            "absolute",
        ),
        (
            '[[stage]]\nname = "s"\n[[stage.task]]\ncommand = "x"\nmax_attempts = 0\n',
            5,
            "stage[0].task[0].max_attempts",
            "out of range (1..100)",
        ),
        (
            '[[stage]]\nname = "s"\n[[stage.task]]\ncommand = "x"\ncpus = -1\n',
            5,
            "stage[0].task[0].cpus",
            "out of range",
        ),
        (
            '[[stage]]\nname = "s"\n[[stage.task]]\ncommand = "x"\ntimeout_s = 0\n',
            5,
            "stage[0].task[0].timeout_s",
            "greater than 0",
        ),
        (
            '[[stage]]\nname = "s"\n[[stage.task]]\ncommand = "x"\ntimeout_s = "1m"\n',
            5,
            "stage[0].task[0].timeout_s",
            "number of seconds",
        ),
        (
            '[[stage]]\nname = "s"\n[[stage.task]]\ncommand = "x"\nenv = { A = 1 }\n',
            5,
            "stage[0].task[0].env.A",
            "expected a string",
        ),
        (
            '[[stage]]\nname = "s"\n[[stage.task]]\ncommand = "x"\nenv = { "A=B" = "1" }\n',
            5,
            "stage[0].task[0].env",
            "invalid environment variable name",
        ),
        (
            '[[stage]]\nname = "s"\n[[stage.task]]\ncommand = "x"\n[stage.task.env]\nA = 1\n',
            6,
            "stage[0].task[0].env.A",
            "expected a string",
        ),
        # frames
        (
            '[[stage]]\nname = "s"\n[[stage.frames]]\ncommand = "x"\n',
            3,
            "stage[0].frames[0]",
            "needs 'frames'",
        ),
        (
            '[[stage]]\nname = "s"\n[[stage.frames]]\ncommand = "x"\nframes = "9-1"\n',
            5,
            "stage[0].frames[0].frames",
            "reversed frame range 9-1",
        ),
        (
            '[[stage]]\nname = "s"\n[[stage.frames]]\ncommand = "x"\nframes = "1-9x0"\n',
            5,
            "stage[0].frames[0].frames",
            "step is 0",
        ),
        (
            '[[stage]]\nname = "s"\n[[stage.frames]]\ncommand = "x"\nframes = 5\n',
            5,
            "stage[0].frames[0].frames",
            "expected a string",
        ),
        (
            '[[stage]]\nname = "s"\n[[stage.frames]]\ncommand = "x"\nframes = "1"\nchunk = 0\n',
            6,
            "stage[0].frames[0].chunk",
            "out of range (>= 1)",
        ),
        (
            '[[stage]]\nname = "s"\n[[stage.frames]]\nframes = "1"\n',
            3,
            "stage[0].frames[0]",
            "needs a 'command'",
        ),
        (
            '[[stage]]\nname = "s"\n[[stage.frames]]\ncommand = "x {start:q}"\nframes = "1"\n',
            3,
            "stage[0].frames[0]",
            "cannot expand",
        ),
    ],
)
def test_errors(text: str, line: int, key: str, fragment: str) -> None:
    e = jerr(text)
    assert e.key == key, str(e)
    assert e.line == line, str(e)
    assert fragment in e.message, str(e)
    assert e.message.startswith(f"{key}: ")
    assert str(e) == f"job.toml:{e.line}:{e.col}: {e.message}"


def test_no_stages() -> None:
    e = jerr('name = "x"\n')
    # every error carries a position (issue 11): the top of the file when nothing is there
    assert str(e) == "job.toml:1:1: no stages: expected at least one [[stage]] with tasks"
    assert (e.line, e.col) == (1, 1)


def test_unlocatable_key_still_names_path() -> None:
    # an inline array of tables is not located by the scanner; the key path is still given
    e = jerr('stage = [{ name = "s", task = [{ comand = "x" }] }]\n')
    assert e.key == "stage[0].task[0].comand"
    assert "unknown key 'comand'" in str(e)


def test_jobfile_is_frozen() -> None:
    job = parse_jobfile(VALID_STAGE)
    assert isinstance(job, JobFile)
    with pytest.raises(AttributeError):
        job.name = "y"  # type: ignore[misc]


# ------------------------------------------------------------------ fuzz

_TOML_LINES = [
    'name = "x"',
    "priority = 1",
    "priority = true",
    "[[stage]]",
    '[[stage]]\nname = "s"',
    "[[stage.task]]",
    "[[stage.frames]]",
    "[stage.task.env]",
    "[defaults]",
    'command = "c {start}"',
    "command = []",
    'command = ["a", "{end:x}"]',
    'frames = "1-10x3,20"',
    'frames = "5-1"',
    "chunk = 3",
    "chunk = 0",
    'requires = ["a", "../b"]',
    'outputs = ["o/{start}"]',
    "env = { A = '1' }",
    "A = 2",
    "cpus = 1.5",
    "timeout_s = 3",
    'placement = "local"',
    "stage = 3",
    "x = [",
    '"""',
    "tags = [1]",
]


@settings(max_examples=300)
@given(st.lists(st.sampled_from(_TOML_LINES), max_size=15))
def test_fuzz_only_jobfile_errors(lines: list[str]) -> None:
    try:
        job = parse_jobfile("\n".join(lines))
    except JobFileError as e:
        assert "\n" not in str(e)
        return
    assert job.stages and all(s.tasks for s in job.stages)
    to_job_submit(job, {p: "0" * 64 for p in job.required_paths()})
