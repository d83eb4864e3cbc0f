"""Nothing a command leaves or a journal holds can wedge the agent (pure logic, fake master).

Names no store can hold, collection limits, journal quarantine, refused
completions isolated from their batch, and the state-dir lock.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from test_agent_daemon import FakeMaster, Running, make_config

from herder.agent.daemon import Agent, run_agent
from herder.agent.delivery import completion_problem
from herder.agent.execspec import ExecSpec
from herder.agent.executor import Executor
from herder.agent.journal import Journal, JournalEntry
from herder.agent.outputs import collect
from herder.api_models import (
    ClaimRequest,
    ClaimResponse,
    Completion,
    OutputFile,
    RequiredFile,
    TaskSpec,
)
from herder.client import ApiError
from herder.names import name_problem
from herder.statelock import StateDirBusy, StateLock

DIGEST = "ab" * 32

# ----------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("out/\udcff", "is not valid UTF-8: 'out/\\udcff' (bytes b'out/\\xff')"),
        ("\ud800", "is not valid UTF-8: '\\ud800'"),  # no file name decodes to it
        ("a\nb", "contains a control character '\\n': 'a\\nb'"),
        ("esc\x1b[31m", "contains a control character '\\x1b'"),
        ("c1\x85", "contains a control character '\\x85'"),
        ("d/" * 2100 + "f", "is longer than 4096 bytes (4201)"),
    ],
)
def test_names_no_store_can_hold(name: str, problem: str) -> None:
    got = name_problem(name)
    assert got is not None and got.startswith(problem), got
    got.encode("utf-8")  # the reason itself is always printable
    with pytest.raises(ValidationError, match="path "):
        OutputFile(path=name, digest=DIGEST, size=1)
    with pytest.raises(ValidationError):
        TaskSpec(command="true", outputs=[name])
    with pytest.raises(ValidationError):
        RequiredFile(path=name, digest=DIGEST)


def test_ordinary_names_are_fine() -> None:
    for name in ("out/é.txt", "a b/c", "日本/x", "x" * 255):
        assert name_problem(name) is None
        assert OutputFile(path=name, digest=DIGEST, size=1).path == name


# ---------------------------------------------------------- collecting


def _touch(root: Path, rel: str | bytes, data: bytes = b"x") -> None:
    path = os.path.join(os.fsencode(root), os.fsencode(rel))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


def test_unstorable_names_are_problems_and_the_rest_is_collected(tmp_path: Path) -> None:
    _touch(tmp_path, b"out/\xff")
    _touch(tmp_path, "new\nline")
    _touch(tmp_path, "back\\slash")
    _touch(tmp_path, "good.txt", b"fine")
    got = collect(tmp_path, {}, None)
    assert [of.path for of, _p in got.files] == ["good.txt"]
    assert got.problems == [
        "output name contains a backslash: 'back\\\\slash'",
        "output name contains a control character '\\n': 'new\\nline'",
        "output name is not valid UTF-8: 'out/\\udcff' (bytes b'out/\\xff')",
    ]


def test_too_many_files_stop_the_walk_before_hashing(tmp_path: Path) -> None:
    for i in range(12):
        _touch(tmp_path, f"f{i:02d}")
    got = collect(tmp_path, {}, None, limit=10)
    assert (got.files, got.problems) == ([], ["the command left more than 10 output files"])
    assert collect(tmp_path, {}, None, limit=12).error is None


def test_problem_list_is_capped(tmp_path: Path) -> None:
    for i in range(25):
        _touch(tmp_path, f"bad{i:02d}\t")
    got = collect(tmp_path, {}, None)
    assert len(got.problems) == 10 and got.hidden == 15
    assert got.error is not None and got.error.endswith("; and 15 more")


def test_special_files_are_never_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")  # opening it for reading would block forever
    os.symlink("/dev/zero", tmp_path / "zero")  # reading it would never end
    os.symlink("pipe", tmp_path / "to-pipe")
    _touch(tmp_path, "real", b"r")
    got = collect(tmp_path, {}, None)
    assert [of.path for of, _p in got.files] == ["real"]
    assert got.problems == [] and got.skipped == [
        "zero: symlink points outside the sandbox (skipped)"
    ]
    declared = collect(tmp_path, {}, ["pipe", "to-pipe", "zero", "real", "gone"])
    assert [of.path for of, _p in declared.files] == ["real"]
    assert declared.problems == [
        "pipe: declared output is a FIFO",
        "to-pipe: declared output is a FIFO",
        "path 'zero' is a symlink that points outside the job root",
        "gone: declared output was not produced",
    ]


def test_a_declared_directory_brings_every_file_under_it(tmp_path: Path) -> None:
    _touch(tmp_path, "out/a", b"a")
    _touch(tmp_path, "out/sub/b", b"b")
    _touch(tmp_path, "other", b"o")
    got = collect(tmp_path, {}, ["out"])
    assert [of.path for of, _p in got.files] == ["out/a", "out/sub/b"]
    assert got.error is None
    _touch(tmp_path, b"out/\xfe")
    bad = collect(tmp_path, {}, ["out"])
    assert bad.error == "output name is not valid UTF-8: 'out/\\udcfe' (bytes b'out/\\xfe')"


def test_executor_marks_the_attempt_failed_by_its_outputs(tmp_path: Path) -> None:
    executor = Executor(tmp_path / "work", tmp_path / "blobs", subreaper=False)
    _ex, res = executor.run(ExecSpec(attempt_id=1, command="touch \"$(printf '\\377')\" ok"))
    assert (res.outcome, res.exit_code, res.outputs_failed) == ("exited", 0, True)
    assert res.error == "output name is not valid UTF-8: '\\udcff' (bytes b'\\xff')"
    _ex, fine = executor.run(ExecSpec(attempt_id=2, command="touch ok"))
    assert (fine.outputs_failed, [of.path for of in fine.output_files]) == (False, ["ok"])


# -------------------------------------------------------------- journal


def _entry(attempt_id: int, **kw: Any) -> JournalEntry:
    c = Completion(attempt_id=attempt_id, token=f"tok{attempt_id}", outcome="exited", **kw)
    return JournalEntry(completion=c)


def test_unreadable_entries_are_quarantined_with_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    j = Journal(tmp_path / "journal")
    j.write(_entry(1, exit_code=0))
    raw = {
        "a2.json": "{not json",
        "a3.json": "[1, 2]",
        "a4.json": json.dumps({"version": 7, "completion": {}}),
        "a5.json": json.dumps(_entry(6).to_json()),  # another attempt's entry
        "a7.json": json.dumps(
            {
                "version": 1,
                "completion": {
                    "attempt_id": 7,
                    "token": "t",
                    "outcome": "exited",
                    "outputs": [{"path": "\udcff", "digest": DIGEST, "size": 1}],
                },
            }
        ),
        "a8.json": b"\xff\xfe".decode("latin-1"),
    }
    for name, text in raw.items():
        (j.root / name).write_text(text, encoding="latin-1" if name == "a8.json" else "utf-8")
    with caplog.at_level(logging.ERROR, "herder.agent"):
        assert [e.attempt_id for e in j.load()] == [1]
    assert sorted(os.listdir(j.root)) == ["a1.json"]
    assert sorted(os.listdir(tmp_path / "quarantine")) == sorted(raw)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == len(raw)
    assert all(ln.startswith("event=journal_quarantined attempt=") for ln in lines)
    reasons = "\n".join(lines)
    assert "attempt=3 reason='unreadable: not a journal entry (a JSON list)'" in reasons
    assert "unknown journal entry version 7" in reasons
    assert "attempt=5 reason='unreadable: holds attempt 6, not 5'" in reasons
    assert "completion.outputs.0.path: Value error, path is not valid UTF-8" in reasons


def test_quarantine_of_an_attempt_never_journaled_keeps_its_completion(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal")
    j.quarantine(9, "undeliverable: test", _entry(9, exit_code=1))
    data = json.loads((tmp_path / "quarantine" / "a9.json").read_text())
    assert data["completion"]["attempt_id"] == 9
    j.write(_entry(9, exit_code=2))
    j.quarantine(9, "again")  # a second quarantine of the same attempt keeps both
    assert sorted(os.listdir(tmp_path / "quarantine")) == ["a9.json", "a9.json.1"]
    assert 9 not in j


def test_completion_problem_finds_what_the_master_would_refuse() -> None:
    ok = Completion(attempt_id=1, token="t", outcome="exited", exit_code=0)
    assert completion_problem(ok) is None
    bad = Completion.model_construct(
        attempt_id=1,
        token="t",
        outcome="exited",
        exit_code=0,
        error="\udcff",
        outputs=[],
        log=[],
        blobs={},
    )
    problem = completion_problem(bad)
    assert problem is not None and problem.startswith("error: Input should be a valid string")
    problem.encode("utf-8")


# ------------------------------------------------------ refused completions


class RefusingMaster(FakeMaster):
    """A fake master that serializes requests like the HTTP client, and refuses
    (422) any request carrying a completion of ``refuse`` (``refuse_minimal``:
    even its minimal failure)."""

    def __init__(self, slots: int) -> None:
        super().__init__(slots)
        self.refuse: set[int] = set()
        self.refuse_minimal: set[int] = set()
        self.requests: list[list[tuple[int, str]]] = []

    def claim(self, agent_id: str, req: ClaimRequest) -> ClaimResponse:
        body = req.model_dump_json()  # PydanticSerializationError, as over HTTP
        with self.lock:
            self.requests.append([(c.attempt_id, c.outcome) for c in req.completions])
        for c in req.completions:
            minimal = c.outcome == "launch_failed" and (c.error or "").startswith("agent error")
            if c.attempt_id in self.refuse_minimal or (c.attempt_id in self.refuse and not minimal):
                raise ApiError(422, "invalid_request", f"attempt {c.attempt_id} refused")
        return super().claim(agent_id, ClaimRequest.model_validate_json(body))


def _journal_files(state: Path, sub: str = "journal") -> list[str]:
    d = state / sub
    return sorted(os.listdir(d)) if d.exists() else []


def test_a_refused_completion_blocks_nothing_and_a_hopeless_one_is_quarantined(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    j = Journal(state / "journal")
    for aid in (11, 12, 13, 14):
        j.write(_entry(aid, exit_code=0))
    fake = RefusingMaster(1)
    fake.refuse = {12}  # refused as it is; its minimal failure is accepted
    fake.refuse_minimal = {14}  # refused whatever it says
    agent = Agent(make_config(tmp_path, slots=1), client=fake)
    with caplog.at_level(logging.INFO, "herder.agent"):
        run = Running(agent)
        fake.wait_for(lambda: len(fake.completions) == 3)
        fake.add("echo after")  # the agent goes on working
        fake.wait_for(lambda: 101 in fake.completions)
        run.stop()
    assert {a: c.outcome for a, c in fake.completions.items()} == {
        11: "exited",
        12: "launch_failed",
        13: "exited",
        101: "exited",
    }
    assert "the completion cannot be delivered: 422 invalid_request: attempt 12 refused" in (
        fake.completions[12].error or ""
    )
    # one batch refused, then one completion per request
    assert fake.requests[:6] == [
        [(11, "exited"), (12, "exited"), (13, "exited"), (14, "exited")],
        [(11, "exited")],
        [(12, "exited")],
        [(12, "launch_failed")],
        [(13, "exited")],
        [(14, "exited")],
    ]
    assert _journal_files(state) == []
    assert _journal_files(state, "quarantine") == ["a14.json"]
    msgs = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith("event=journal_quarantined attempt=14 reason='undeliverable") for m in msgs
    )
    assert agent.stats["dropped"] == 1


def test_an_unserializable_completion_is_replaced_not_retried(tmp_path: Path) -> None:
    fake = RefusingMaster(1)
    agent = Agent(make_config(tmp_path, slots=1), client=fake)
    bad = Completion.model_construct(
        attempt_id=21,
        token="tok21",
        outcome="exited",
        exit_code=0,
        error=None,
        outputs=[OutputFile.model_construct(path="\udcff", digest=DIGEST, size=1, mode=0o644)],
        log=[],
        blobs={},
    )
    good = Completion(attempt_id=22, token="tok22", outcome="exited", exit_code=0)
    # what an older agent left in memory or journal: replayed before any claim
    agent.journal.load = lambda: [JournalEntry(completion=bad), JournalEntry(completion=good)]  # type: ignore[method-assign]
    run = Running(agent)
    fake.wait_for(lambda: {21, 22} <= set(fake.completions))
    run.stop()
    assert fake.completions[22].outcome == "exited"
    replaced = fake.completions[21]
    assert (replaced.outcome, replaced.outputs) == ("launch_failed", [])
    assert "outputs.0.path: Value error, path is not valid UTF-8: '\\udcff'" in (
        replaced.error or ""
    )
    assert fake.requests[0] == [(21, "launch_failed"), (22, "exited")]  # fixed before sending


def test_a_bad_output_name_fails_its_task_and_the_next_one_runs(tmp_path: Path) -> None:
    fake = RefusingMaster(1)
    fake.add("touch \"$(printf 'x\\377')\" fine")
    fake.add("echo ok > good")
    agent = Agent(make_config(tmp_path, slots=1), client=fake)
    run = Running(agent)
    fake.wait_for(lambda: {101, 102} <= set(fake.completions))
    run.stop()
    bad, good = fake.completions[101], fake.completions[102]
    assert (bad.outcome, bad.exit_code, bad.outputs) == ("exited", None, [])
    assert bad.error == (
        "output name is not valid UTF-8: 'x\\udcff' (bytes b'x\\xff') (the command exited 0)"
    )
    assert (good.outcome, good.exit_code, [o.path for o in good.outputs]) == ("exited", 0, ["good"])


# ------------------------------------------------------------ state lock


def test_state_lock_is_exclusive_and_names_the_holder(tmp_path: Path) -> None:
    with StateLock(tmp_path / "s") as lock:
        assert (tmp_path / "s" / "lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(StateDirBusy) as info:
            StateLock(tmp_path / "s")
        assert info.value.pid == os.getpid() and info.value.lock_path == lock.path
        assert str(info.value) == (
            f"state directory {tmp_path / 's'} is in use by another herder process "
            f"(pid {os.getpid()}; lock {tmp_path / 's' / 'lock'})"
        )
    StateLock(tmp_path / "s").release()  # free again once released


def test_an_agent_on_a_locked_state_dir_refuses_to_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = make_config(tmp_path, slots=1)
    (cfg.state_dir / "journal").mkdir(parents=True)
    Journal(cfg.state_dir / "journal").write(_entry(5, exit_code=0))
    fake = FakeMaster(1)
    with StateLock(cfg.state_dir):
        with pytest.raises(StateDirBusy):
            Agent(cfg, client=fake).run()
        assert run_agent(cfg, client=fake) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: state directory {cfg.state_dir} is in use by another herder process "
        f"(pid {os.getpid()}; lock {cfg.state_dir / 'lock'})"
    ]
    # nothing was touched: no registration, the journal entry still there
    assert fake.registrations == [] and _journal_files(cfg.state_dir) == ["a5.json"]


def test_a_journal_entry_naming_a_file_outside_its_sandbox_is_quarantined(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, slots=1)
    assert cfg.work_root is not None
    (cfg.work_root / "a31" / "work").mkdir(parents=True)
    inside = cfg.work_root / "a31" / "work" / "o"
    inside.write_bytes(b"mine")
    j = Journal(cfg.state_dir / "journal")
    for aid, path in ((31, str(inside)), (32, "/dev/zero"), (33, str(inside))):
        c = Completion(attempt_id=aid, token=f"tok{aid}", outcome="exited", exit_code=0)
        j.write(JournalEntry(completion=c, blobs={DIGEST: path}))
    fake = FakeMaster(1)
    fake.blobs[DIGEST] = b"known"  # nothing to upload for 31
    agent = Agent(cfg, client=fake)
    run = Running(agent)
    fake.wait_for(lambda: 31 in fake.completions)
    run.stop()
    assert sorted(fake.completions) == [31]
    assert _journal_files(cfg.state_dir, "quarantine") == ["a32.json", "a33.json"]


def test_a_lone_completion_refused_twice_is_dropped(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Journal(state / "journal").write(_entry(41, exit_code=0))
    fake = RefusingMaster(1)
    fake.refuse_minimal = {41}
    agent = Agent(make_config(tmp_path, slots=1), client=fake)
    run = Running(agent)
    fake.wait_for(lambda: _journal_files(state, "quarantine") == ["a41.json"])
    fake.add("true")
    fake.wait_for(lambda: 101 in fake.completions)
    run.stop()
    assert [r for r in fake.requests if r] == [
        [(41, "exited")],
        [(41, "launch_failed")],
        [(101, "exited")],
    ]
    assert 41 not in fake.completions and _journal_files(state) == []
