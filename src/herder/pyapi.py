"""``herder.Client``: the Python API of a farm (DESIGN §1), for scripts and tools.

A :class:`herder.client.HerderClient` (every route of the master API, the
same retries and failover) with a few conveniences on top::

    from herder import Client

    with Client("http://127.0.0.1:6240") as farm:
        job = farm.submit({"name": "hello", "stages": [{"name": "s", "tasks": [{"command": "echo hi"}]}]})
        farm.pause_job(job.id)                  # nothing new starts
        farm.update_job(job.id, priority=10, tags=["gpu"])
        farm.resume_job(job.id)
        done = farm.wait(job.id)                # the final JobView
        if done.state == "failed":
            farm.retry_job(job.id)              # failed tasks again, fresh budgets
        farm.fetch_outputs(job.id, "out/")      # every succeeded task's output files
        # a job that starts once `job` succeeded (held, not failed, if it fails):
        comp = farm.submit({"name": "comp", "stages": [...]}, depends_on=[job.id],
                           on_parent_failure="hold")
        [parent.state for parent in farm.get_job(comp.id).depends_on]

Errors are :class:`herder.client.ApiError` (``NotFoundError`` 404,
``ConflictError`` 409: not allowed in the job's state; 422: a bad field).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from herder.api_models import EventView, JobSubmit, JobView, OnParentFailure
from herder.client.core import HerderClient
from herder.client.files import InputSource, input_sources
from herder.paths import normalize_relpath
from herder.records import FINAL_TASK_STATES


class Client(HerderClient):
    """A farm's Python API: submit, control, wait, follow events, fetch outputs."""

    def __enter__(self) -> Client:
        return self

    def submit(
        self,
        spec: JobSubmit | Mapping[str, Any],
        *,
        depends_on: Sequence[int] = (),
        on_parent_failure: OnParentFailure | None = None,
        root: Path | str | None = None,
        inputs: Mapping[str, InputSource] | None = None,
    ) -> JobView:
        """Submit a job (a ``JobSubmit`` or its JSON form as a dict).

        ``depends_on``: jobs that must succeed before this one starts (added to
        the spec's); ``on_parent_failure``: ``"fail"`` or ``"hold"`` when one
        of them fails. The view's ``depends_on`` and ``dependents`` link both ways.

        ``root``: the directory the tasks' required files (``requires`` paths)
        are in; ``inputs``: ``{digest: file or bytes}`` besides. With either,
        the job is sent in two transactions (issue 10): the master creates it
        waiting for the files it lacks, and this uploads those before it returns.
        """
        if isinstance(spec, JobSubmit) and not depends_on and on_parent_failure is None:
            job = spec
        else:
            data = spec.model_dump() if isinstance(spec, JobSubmit) else dict(spec)
            if depends_on:
                data["depends_on"] = [*data.get("depends_on", []), *depends_on]
            if on_parent_failure is not None:
                data["on_parent_failure"] = on_parent_failure
            job = JobSubmit.model_validate(data)
        if root is None and inputs is None:
            return self.submit_job(job)
        sources: dict[str, InputSource] = {}
        if root is not None:
            pairs = [(r.path, r.digest) for st in job.stages for t in st.tasks for r in t.requires]
            sources.update(input_sources(Path(root), pairs))
        sources.update(inputs or {})
        return self.submit_job(job, inputs=sources)

    def wait(self, job_id: int, timeout_s: float | None = None) -> JobView:
        """Wait (long-polling the follow stream) until the job is over; its final view.

        TimeoutError when ``timeout_s`` passes first. A paused job is not over.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        after = 0
        while True:
            wait_s = 20.0 if deadline is None else max(0.0, min(20.0, deadline - time.monotonic()))
            page = self.follow_job(job_id, after, wait_s=wait_s)
            after = page.next
            if page.state in FINAL_TASK_STATES:
                return self.get_job(job_id)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {page.state} after {timeout_s:g}s")

    def events(self, job_id: int, after: int = 0) -> Iterator[EventView]:
        """The job's events as they happen, until it is over."""
        return self.iter_job_events(job_id, after)

    def fetch_outputs(self, job_id: int, dest: Path | str) -> list[Path]:
        """Download the output files of the job's succeeded tasks under ``dest``; their paths."""
        root = Path(dest)
        got: list[Path] = []
        for stage in self.get_job(job_id).stages:
            for task in stage.tasks:
                if task.state != "succeeded" or not task.attempts:
                    continue
                for out in task.attempts[-1].outputs:
                    path = root / normalize_relpath(out.path)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    self.download_blob(out.digest, path, mode=out.mode)
                    got.append(path)
        return got
