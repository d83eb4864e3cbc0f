"""herder.build (``herder run``) given a rejected task by the follow stream (issue 13):
the action fails with the ACL's reason, the build stops, no log is fetched."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from herder.api_models import JobSubmit
from herder.build import Build
from herder.rakefile import parse_rakefile
from herder.records import FollowPage, Submitted, TaskResult
from herder.reporting import PlainReporter

REASON = "pool render: owner bob not allowed"


class OnePageClient:
    def __init__(self, page: FollowPage) -> None:
        self.page = page
        self.cancelled: list[int] = []
        self.fetched: list[Any] = []

    def missing_blobs(self, digests: Any) -> list[str]:
        return list(digests)

    def submit_job_ids(self, spec: JobSubmit) -> Submitted:
        n = sum(len(s.tasks) for s in spec.stages)
        return Submitted(1, True, list(range(10, 10 + n)))

    def follow_job(self, job_id: int, after: int = 0, **_: Any) -> FollowPage:
        return self.page

    def cancel_job(self, job_id: int) -> None:
        self.cancelled.append(job_id)

    def read_full_log(self, attempt_id: int, stream: str = "stdout") -> str:
        self.fetched.append((attempt_id, stream))
        return ""


def test_a_rejected_task_fails_its_action_with_the_reason(tmp_path: Path) -> None:
    rake = parse_rakefile("a:\n\tremote-one\n\tremote-two\nb:\n\tremote-never\n", "Rakefile")
    # As the store's follow read gives them: no attempt, no logs, the reason as error.
    results = [TaskResult(t, None, "rejected", None, REASON) for t in (10, 11)]
    client = OnePageClient(FollowPage(1, "failed", 4, results=results))
    out = io.StringIO()
    build = Build(client, rake, tmp_path, PlainReporter(out), follow_wait_s=0.1)  # type: ignore[arg-type]
    assert not build.run()
    text = out.getvalue()
    assert f"FAILED (rejected: {REASON})" in text
    assert f"build FAILED: action a[0] `one` (line 2): rejected: {REASON}" in text
    assert "never reported" not in text
    assert client.fetched == []  # nothing ran, nothing to read
    assert "== b" not in text  # no later actionset starts
