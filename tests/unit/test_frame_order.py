"""Frame order (issue 13) and the job-file keys of dependent jobs.

``dispatch_order``: the first task, the last, then middle-out by binary
subdivision, each position once. ``dispatch_ids``: the claim's ascending ids
handed out in that order, listed in submission order. TOML and JSON job
files carry ``frame_order``, ``depends_on`` and ``on_parent_failure`` into
the ``JobSubmit``; a bad value is an error at its ``file:line:col``.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from herder.api_models import JobSubmit
from herder.cli_jobs import with_parents
from herder.frames import dispatch_ids, dispatch_order
from herder.jobfile import JobFileError, parse_jobfile, to_job_submit
from herder.jsonjob import parse_json_job

FRAMES_JOB = """\
name = "shot"
frame_order = "first-last-middle"
depends_on = [7, 3, 7]
on_parent_failure = "hold"

[[stage]]
name = "render"

[[stage.frames]]
command = "render -s {start} -e {end}"
frames = "1-9"
"""


def test_first_last_then_middle_out() -> None:
    assert dispatch_order(9) == [0, 8, 4, 2, 6, 1, 3, 5, 7]
    assert dispatch_order(17)[:5] == [0, 16, 8, 4, 12]
    assert dispatch_order(5) == [0, 4, 2, 1, 3]
    assert dispatch_order(2) == [0, 1] and dispatch_order(1) == [0] and dispatch_order(0) == []
    assert dispatch_order(9, "sequential") == list(range(9))
    with pytest.raises(ValueError, match="unknown frame order"):
        dispatch_order(9, "random")


@given(st.integers(min_value=0, max_value=3000))
def test_dispatch_order_is_a_permutation_opening_with_the_ends(n: int) -> None:
    order = dispatch_order(n)
    assert sorted(order) == list(range(n))
    if n >= 2:
        assert order[:2] == [0, n - 1]


@given(st.integers(min_value=3, max_value=2000))
def test_each_round_halves_the_largest_gap(n: int) -> None:
    """After the first k tasks, no gap between started positions is wider than needed:
    once 2**r + 1 positions started, every gap is at most ceil((n-1) / 2**r)."""
    order = dispatch_order(n)
    r = 0
    while (1 << r) + 1 <= n:
        started = sorted(order[: (1 << r) + 1])
        widest = max(b - a for a, b in itertools.pairwise(started))
        assert widest <= -(-(n - 1) // (1 << r))
        r += 1


@given(st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=6))
def test_dispatch_ids_hands_ascending_ids_out_in_dispatch_order(sizes: list[int]) -> None:
    ids = list(range(100, 100 + sum(sizes)))
    out = dispatch_ids(ids, sizes, "first-last-middle")
    assert sorted(out) == ids
    pos = 0
    for size in sizes:
        block = out[pos : pos + size]
        # the task at dispatch rank k holds the stage's k-th lowest id
        assert [block[i] for i in dispatch_order(size)] == sorted(block)
        pos += size
    assert dispatch_ids(ids, sizes, "sequential") == ids


def test_dispatch_ids_refuses_a_count_mismatch() -> None:
    with pytest.raises(ValueError, match="3 ids for 4 tasks"):
        dispatch_ids([1, 2, 3], [4], "first-last-middle")


def test_toml_job_file_carries_the_new_keys_into_the_submission() -> None:
    jf = parse_jobfile(FRAMES_JOB, "shot.toml")
    assert (jf.frame_order, jf.depends_on, jf.on_parent_failure) == (
        "first-last-middle",
        [7, 3],
        "hold",
    )
    spec = to_job_submit(jf, {})
    assert (spec.frame_order, spec.depends_on, spec.on_parent_failure) == (
        "first-last-middle",
        [7, 3],
        "hold",
    )
    # names and frame labels stay in frame order; the store reorders only the ids
    assert [t.name for t in spec.stages[0].tasks] == [f"render[{i}]" for i in range(1, 10)]
    plain = to_job_submit(
        parse_jobfile('[[stage]]\nname = "s"\n[[stage.task]]\ncommand = "x"\n'), {}
    )
    assert (plain.frame_order, plain.depends_on, plain.on_parent_failure) == (
        "sequential",
        [],
        "fail",
    )


@pytest.mark.parametrize(
    ("line", "where", "message"),
    [
        ('frame_order = "random"', "2:1", 'frame_order: expected "sequential" or'),
        ("frame_order = 3", "2:1", "frame_order: expected a string"),
        ('on_parent_failure = "ignore"', "2:1", 'on_parent_failure: expected "fail" or "hold"'),
        ("depends_on = 4", "2:1", "depends_on: expected an array of job ids"),
        ('depends_on = [1, "two"]', "2:1", "depends_on[1]: expected an integer"),
        ("depends_on = [0]", "2:1", "depends_on[0]: 0 is out of range"),
    ],
)
def test_bad_values_are_located(line: str, where: str, message: str) -> None:
    text = f'name = "j"\n{line}\n[[stage]]\nname = "s"\n[[stage.task]]\ncommand = "x"\n'
    with pytest.raises(JobFileError) as info:
        parse_jobfile(text, "j.toml")
    assert str(info.value).startswith(f"j.toml:{where}: {message}"), str(info.value)


def test_json_job_file_and_the_api_model() -> None:
    text = (
        '{"name": "j", "depends_on": [5, 5, 2], "frame_order": "first-last-middle",\n'
        ' "stages": [{"name": "s", "tasks": [{"command": "x"}]}]}'
    )
    job, _ = parse_json_job(text, "j.json")
    assert job.depends_on == [5, 2] and job.frame_order == "first-last-middle"
    with pytest.raises(JobFileError, match=r"j.json:2:\d+: on_parent_failure"):
        parse_json_job(
            '{"name": "j",\n "on_parent_failure": "maybe", "stages": '
            '[{"name": "s", "tasks": [{"command": "x"}]}]}',
            "j.json",
        )
    with pytest.raises(ValidationError, match="depends_on"):
        JobSubmit.model_validate(
            {
                "name": "j",
                "depends_on": [-1],
                "stages": [{"name": "s", "tasks": [{"command": "x"}]}],
            }
        )


def test_cli_depends_on_adds_to_the_job_files() -> None:
    spec = to_job_submit(parse_jobfile(FRAMES_JOB, "shot.toml"), {})
    merged = with_parents(spec, (3, 11), "fail")
    assert merged.depends_on == [7, 3, 11] and merged.on_parent_failure == "fail"
    assert with_parents(spec, (), None) is spec
