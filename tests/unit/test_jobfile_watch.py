"""progress_pattern and stuck_timeout_s in TOML and JSON job files (issue 13)."""

from __future__ import annotations

import pytest

from herder.jobfile import JobFileError, parse_jobfile, to_job_submit
from herder.jsonjob import parse_json_job

GOOD = """\
name = "render"
[defaults]
stuck_timeout_s = 600

[[stage]]
name = "frames"

[[stage.frames]]
command = "blender -b s.blend -s {start} -e {end} -a"
frames = "1-4"
progress_pattern = 'Fra:\\d+ .* (\\d+)/100'
"""


def test_toml_fields_reach_the_submission() -> None:
    job = to_job_submit(parse_jobfile(GOOD, path="job.toml"), {})
    tasks = job.stages[0].tasks
    assert len(tasks) == 4
    assert all(t.progress_pattern == r"Fra:\d+ .* (\d+)/100" for t in tasks)
    assert all(t.stuck_timeout_s == 600.0 for t in tasks)


@pytest.mark.parametrize(
    ("line", "where", "message"),
    [
        ("progress_pattern = '\\d+%'", "job.toml:6:1", "exactly one capturing group"),
        ("progress_pattern = '(\\d+%'", "job.toml:6:1", "not a valid regular expression"),
        ("progress_pattern = 5", "job.toml:6:1", "expected a string"),
        ("stuck_timeout_s = 0", "job.toml:6:1", "greater than 0"),
        ("stuck_timeout_s = 'soon'", "job.toml:6:1", "expected a number of seconds"),
    ],
)
def test_toml_errors_name_file_and_line(line: str, where: str, message: str) -> None:
    text = f'name = "x"\n[[stage]]\nname = "s"\n[[stage.task]]\ncommand = "true"\n{line}\n'
    with pytest.raises(JobFileError) as ei:
        parse_jobfile(text, path="job.toml")
    assert str(ei.value).startswith(where), str(ei.value)
    assert message in str(ei.value)


def test_json_errors_name_file_and_line() -> None:
    text = (
        '{"name": "x", "stages": [{"name": "s", "tasks": [\n'
        '  {"command": "true",\n'
        '   "progress_pattern": "(a)(b)"}]}]}\n'
    )
    with pytest.raises(JobFileError) as ei:
        parse_json_job(text, path="job.json")
    assert str(ei.value).startswith("job.json:3:"), str(ei.value)
    assert "exactly one capturing group" in str(ei.value)
