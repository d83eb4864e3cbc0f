"""The embedded farm (``herder run``) abandons what an earlier run left unfinished,
waiting jobs (depends_on) included: nobody is left to retry their parents (issue 13)."""

from __future__ import annotations

from pathlib import Path

from herder.api_models import TaskSpec
from herder.embedded import EmbeddedFarm
from herder.store import Store
from storekit import job, tasks


def test_a_new_run_cancels_the_waiting_jobs_a_killed_run_left(tmp_path: Path) -> None:
    state = tmp_path / ".herder"
    state.mkdir()
    # What a killed `herder run` leaves: a queued parent and children waiting for it.
    with Store.open(f"sqlite:///{state / 'herder.db'}", migrate=True) as store:
        parent, _ = store.submit_job(job([TaskSpec(command="sleep 60")], name="parent"))
        held, _ = store.submit_job(
            job(tasks(2), name="held", depends_on=[parent.id], on_parent_failure="hold")
        )
        failing, _ = store.submit_job(job(tasks(1), name="failing", depends_on=[parent.id]))
        assert store.get_job(held.id).state == "waiting"

    with EmbeddedFarm(state, slots=1) as farm:
        views = {j: farm.store.get_job(j) for j in (parent.id, held.id, failing.id)}
        assert {j: v.state for j, v in views.items()} == {
            parent.id: "cancelled",
            held.id: "cancelled",
            failing.id: "failed",  # its parent's cancel failed it first (on_parent_failure)
        }
        for v in views.values():
            assert {t.state for s in v.stages for t in s.tasks} == {"cancelled"}
        (ev,) = [e for e in farm.store.list_events(job_id=held.id) if e.kind == "job.cancel"]
        assert ev.from_state == "waiting" and "abandoned" in (ev.reason or "")
        assert farm.store.list_jobs(state="waiting") == []
