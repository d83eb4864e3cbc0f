"""herder.build against a scripted client: the follow stream, inline results, the safety net."""

from __future__ import annotations

import hashlib
import io
import threading
from pathlib import Path
from typing import Any

from herder.api_models import JobSubmit
from herder.build import Build
from herder.rakefile import parse_rakefile
from herder.records import FollowPage, OutputRecord, Submitted, TaskResult
from herder.reporting import PlainReporter


class ScriptedClient:
    """Answers follow calls from a script of pages (keyed by `after`)."""

    def __init__(self, pages: dict[int, list[FollowPage]]) -> None:
        self.pages = pages
        self.calls: list[int] = []
        self.submitted: list[JobSubmit] = []
        self.downloads: list[str] = []
        self.logs: list[tuple[int, str]] = []
        self.lock = threading.Lock()

    def missing_blobs(self, digests: Any) -> list[str]:
        return list(digests)

    def put_blob(self, digest: str, data: bytes) -> None:
        raise AssertionError("small files ride inline")

    def submit_job_ids(self, spec: JobSubmit) -> Submitted:
        self.submitted.append(spec)
        n = sum(len(s.tasks) for s in spec.stages)
        return Submitted(1, True, list(range(10, 10 + n)))

    def follow_job(self, job_id: int, after: int = 0, **_: Any) -> FollowPage:
        with self.lock:
            self.calls.append(after)
            queue = self.pages.get(after)
            assert queue, f"unexpected follow after={after}"
            return queue.pop(0) if len(queue) > 1 else queue[0]

    def cancel_job(self, job_id: int) -> None:
        pass

    def read_full_log(self, attempt_id: int, stream: str = "stdout") -> str:
        self.logs.append((attempt_id, stream))
        return f"long {stream}"

    def download_blob(self, digest: str, dest: Path | str, *, mode: int | None = None) -> int:
        self.downloads.append(digest)
        Path(dest).write_bytes(b"big")
        return 3


def _ok(task_id: int, **kw: Any) -> TaskResult:
    defaults: dict[str, Any] = {"attempt_id": task_id + 100, "stdout": "", "stderr": ""}
    defaults.update(kw)
    return TaskResult(task_id, None, "succeeded", 0, None, **defaults)


def test_results_inline_and_fetched_and_a_skipped_event_is_recovered(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("x")
    rake = parse_rakefile(
        "a:\n\tremote-one\n\t\trequires in.txt\n\tremote-two\n\tremote-three\n", "Rakefile"
    )
    small = b"small output"
    d_small = hashlib.sha256(small).hexdigest()
    d_big = "b" * 64
    one = _ok(
        10,
        stdout="hi\n",
        outputs=[OutputRecord("out/one.txt", d_small, len(small), 0o640)],
        blobs={d_small: small},
    )
    two = _ok(11, stdout=None, stdout_len=10**6, outputs=[OutputRecord("two.bin", d_big, 3, 0o644)])
    three = _ok(12)
    client = ScriptedClient(
        {
            0: [FollowPage(1, "running", 5, started=[10, 11, 12], results=[one, two])],
            # The job is over, but task 12's final event was skipped (ids out of
            # commit order): the build reads the stream again from the start.
            5: [FollowPage(1, "succeeded", 5)],
            9: [FollowPage(1, "succeeded", 9)],
        }
    )
    client.pages[0].append(FollowPage(1, "succeeded", 9, results=[one, two, three]))
    out = io.StringIO()
    build = Build(client, rake, tmp_path, PlainReporter(out), follow_wait_s=0.1)  # type: ignore[arg-type]
    assert build.run(), out.getvalue()
    assert (tmp_path / "out" / "one.txt").read_bytes() == small
    assert (tmp_path / "out" / "one.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "two.bin").read_bytes() == b"big"
    assert client.downloads == [d_big]
    assert client.logs == [(111, "stdout")]
    assert client.calls.count(0) == 2  # read again from the start once
    spec = client.submitted[0]
    (digest,) = spec.blobs
    assert digest == hashlib.sha256(b"x").hexdigest()
    assert "[a[0] stdout] hi" in out.getvalue()
    assert "build succeeded: 3 action(s)" in out.getvalue()


def test_a_failed_result_stops_the_build(tmp_path: Path) -> None:
    rake = parse_rakefile("a:\n\tremote-bad\nb:\n\tremote-never\n", "Rakefile")
    bad = TaskResult(10, None, "failed", 2, "exit status 2", attempt_id=1, stdout="", stderr="no\n")
    client = ScriptedClient({0: [FollowPage(1, "failed", 3, results=[bad])]})
    out = io.StringIO()
    build = Build(client, rake, tmp_path, PlainReporter(out), follow_wait_s=0.1)  # type: ignore[arg-type]
    assert not build.run()
    text = out.getvalue()
    assert "build FAILED" in text and "exit status 2" in text and "  no" in text
    assert len(client.submitted) == 1, "no later actionset may start"
