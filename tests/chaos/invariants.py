"""Invariants of DESIGN §5 checked after a chaos run: nothing lost, nothing twice.

Pure functions over the API's views (``JobView``, ``EventView``) that return
a list of violations (empty = fine), so a unit test can feed them synthetic
histories (tests/chaos/test_invariants.py) and a chaos test can report every
violation at once.

What is checked:

* **states** — every task of the job is ``succeeded`` (or the state a test
  expects) and the job is ``succeeded``;
* **attempts** — per task, exactly one attempt is ``succeeded``, it is the
  task's last attempt (the current one when the task finished), attempt
  numbers are 1..n without gaps, and no attempt is left ``offered`` or
  ``running`` once its task is final;
* **event paths** — per task, the events in id order form a legal path of
  ``herder.core.states.TASK_TRANSITIONS`` from the task's initial state
  (``queued`` for stage 0, ``blocked`` after), each event's ``from_state``
  is the previous event's ``to_state``, the path ends in the task's current
  state, and ``succeeded`` is entered at most once;
* **fencing** — every task event that carries an attempt (ack, success,
  failure, release, requeue) names the task's *current* attempt: the one
  offered by the latest ``task.offer`` before it; a completion accepted from
  an older attempt is a violation. The succeeded attempt of the job view is
  the one named by the task's ``task.succeed`` event;
* **job events** — the job enters ``succeeded`` exactly once;
* **outputs** — every succeeded attempt brought back exactly the expected
  files, and the blob store holds exactly the expected bytes under each
  digest (``check_outputs``).
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from herder.api_models import EventView, JobView, TaskView
from herder.core.states import TASK_TRANSITIONS, TaskEvent, TaskState

ACTIVE_ATTEMPT_STATES = frozenset({"offered", "running"})
FINAL_TASK_STATES = frozenset({"succeeded", "failed", "cancelled"})
REQUEUE_KINDS = frozenset(
    {"task.lease_expired", "task.offer_expired", "task.release", "task.fail_retry"}
)


class InvariantViolation(AssertionError):
    pass


@dataclass
class Summary:
    tasks: int = 0
    attempts: int = 0
    events: int = 0
    requeues: Counter[str] = field(default_factory=Counter)  # kind → count
    reasons: Counter[str] = field(default_factory=Counter)  # requeue reason → count
    violations: list[str] = field(default_factory=list)

    def requeue_total(self) -> int:
        return sum(self.requeues.values())


def all_tasks(job: JobView) -> list[TaskView]:
    return [t for s in job.stages for t in s.tasks]


def initial_state(task: TaskView) -> str:
    return TaskState.QUEUED.value if task.stage == 0 else TaskState.BLOCKED.value


def check_event_paths(
    events: Iterable[EventView],
    initial: Mapping[int, str],
    final: Mapping[int, str] | None = None,
) -> list[str]:
    """Per task: a legal path, succeeded at most once, and fenced attempt ids.

    ``initial`` maps each task id to its state at submission; ``final`` (if
    given) to the state the task is in now, which the path must end in.
    Events of tasks not in ``initial`` are violations (they belong to no task
    of the job).
    """
    out: list[str] = []
    by_task: dict[int, list[EventView]] = defaultdict(list)
    for e in events:
        if e.task_id is None:
            continue
        if e.task_id not in initial:
            out.append(f"event {e.id} ({e.kind}) names task {e.task_id}, not a task of the job")
            continue
        by_task[e.task_id].append(e)
    legal = {(s.value, ev.value): dst.value for (s, ev), dst in TASK_TRANSITIONS.items()}
    for task_id, start in initial.items():
        evs = sorted(by_task.get(task_id, []), key=lambda e: e.id)
        state = start
        current_attempt: int | None = None
        successes = 0
        for e in evs:
            where = f"task {task_id} event {e.id} ({e.kind} {e.from_state}->{e.to_state})"
            if not e.kind.startswith("task."):
                out.append(f"{where}: not a task event")
                continue
            name = e.kind.removeprefix("task.")
            try:
                event = TaskEvent(name)
            except ValueError:
                out.append(f"{where}: unknown task event {name!r}")
                state = e.to_state or state
                continue
            if e.from_state != state:
                out.append(f"{where}: from_state is not the previous state {state!r}")
            target = legal.get((e.from_state or "", event.value))
            if target is None:
                out.append(f"{where}: illegal transition {event.value!r} from {e.from_state!r}")
            elif target != e.to_state:
                out.append(f"{where}: {event.value!r} from {e.from_state!r} must go to {target!r}")
            if e.to_state == TaskState.SUCCEEDED.value:
                successes += 1
                if successes > 1:
                    out.append(f"{where}: task entered succeeded a second time")
            # Fencing: an offer makes its attempt current; every other event that
            # names an attempt must name the current one.
            if event is TaskEvent.OFFER:
                if e.attempt_id is None:
                    out.append(f"{where}: an offer without an attempt")
                current_attempt = e.attempt_id
            elif e.attempt_id is not None and e.attempt_id != current_attempt:
                out.append(
                    f"{where}: names attempt {e.attempt_id} but the current attempt is "
                    f"{current_attempt} (accepted from a non-current attempt)"
                )
            state = e.to_state or state
        if final is not None and task_id in final and final[task_id] != state:
            out.append(
                f"task {task_id}: events end in {state!r} but the task is {final[task_id]!r}"
            )
    return out


def check_attempts(job: JobView, events: Iterable[EventView] = ()) -> list[str]:
    """Per task: one succeeded attempt iff succeeded, the last one, none left active."""
    out: list[str] = []
    succeed_attempt: dict[int, list[int | None]] = defaultdict(list)
    for e in events:
        if e.kind == "task.succeed" and e.task_id is not None:
            succeed_attempt[e.task_id].append(e.attempt_id)
    for t in all_tasks(job):
        ok = [a for a in t.attempts if a.state == "succeeded"]
        numbers = sorted(a.number for a in t.attempts)
        if numbers != list(range(1, len(numbers) + 1)):
            out.append(f"task {t.id}: attempt numbers {numbers} are not 1..n")
        if t.state == "succeeded":
            if len(ok) != 1:
                out.append(
                    f"task {t.id}: {len(ok)} succeeded attempts {[a.id for a in ok]} (want 1)"
                )
            elif ok[0].number != max(numbers):
                out.append(
                    f"task {t.id}: succeeded attempt {ok[0].id} (#{ok[0].number}) is not the "
                    f"last attempt (#{max(numbers)})"
                )
            if t.id in succeed_attempt and ok and succeed_attempt[t.id] != [ok[0].id]:
                out.append(
                    f"task {t.id}: task.succeed events name attempts {succeed_attempt[t.id]}, "
                    f"the succeeded attempt is {ok[0].id}"
                )
        elif ok:
            out.append(f"task {t.id} is {t.state} but has succeeded attempts {[a.id for a in ok]}")
        if t.state in FINAL_TASK_STATES:
            left = [a.id for a in t.attempts if a.state in ACTIVE_ATTEMPT_STATES]
            if left:
                out.append(f"task {t.id} is {t.state} but attempts {left} are still active")
    return out


def check_job(
    job: JobView,
    events: list[EventView],
    *,
    expect_task_state: str = "succeeded",
    expect_job_state: str = "succeeded",
) -> Summary:
    """Every check above except outputs; returns a summary with the violations."""
    s = Summary()
    tasks = all_tasks(job)
    s.tasks = len(tasks)
    s.attempts = sum(len(t.attempts) for t in tasks)
    s.events = len(events)
    if job.state != expect_job_state:
        s.violations.append(f"job {job.id} is {job.state}, want {expect_job_state}")
    for t in tasks:
        if t.state != expect_task_state:
            s.violations.append(f"task {t.id} ({t.name}) is {t.state}, want {expect_task_state}")
    s.violations += check_event_paths(
        events, {t.id: initial_state(t) for t in tasks}, {t.id: t.state for t in tasks}
    )
    s.violations += check_attempts(job, events)
    job_succeeded = [e for e in events if e.task_id is None and e.to_state == "succeeded"]
    if expect_job_state == "succeeded" and len(job_succeeded) != 1:
        s.violations.append(f"the job entered succeeded {len(job_succeeded)} times (want 1)")
    for e in events:
        if e.kind in REQUEUE_KINDS:
            s.requeues[e.kind] += 1
            reason = e.reason or "-"
            s.reasons[reason if len(reason) <= 60 else reason[:57] + "..."] += 1
    return s


def check_outputs(
    job: JobView,
    expected: Mapping[int, Mapping[str, bytes]],
    get_blob: Callable[[str], bytes],
) -> list[str]:
    """``expected`` maps task id → {path: bytes} its succeeded attempt must have produced."""
    out: list[str] = []
    for t in all_tasks(job):
        if t.id not in expected:
            continue
        ok = [a for a in t.attempts if a.state == "succeeded"]
        if len(ok) != 1:
            out.append(f"task {t.id}: no single succeeded attempt to check outputs of")
            continue
        got = {o.path: o for o in ok[0].outputs}
        want = expected[t.id]
        if set(got) != set(want):
            out.append(f"task {t.id}: outputs {sorted(got)}, want {sorted(want)}")
        for path, data in want.items():
            o = got.get(path)
            if o is None:
                continue
            digest = hashlib.sha256(data).hexdigest()
            if o.digest != digest or o.size != len(data):
                out.append(
                    f"task {t.id}: {path} is {o.digest[:12]}…/{o.size}B, "
                    f"want {digest[:12]}…/{len(data)}B"
                )
                continue
            try:
                blob = get_blob(o.digest)
            except Exception as exc:  # a missing blob is a violation, not a crash
                out.append(f"task {t.id}: blob {o.digest[:12]}… of {path} unreadable: {exc!r}")
                continue
            if blob != data:
                out.append(f"task {t.id}: blob of {path} has the wrong bytes")
    return out


def assert_no_violations(violations: list[str], what: str = "invariants") -> None:
    if violations:
        shown = "\n  ".join(violations[:40])
        more = f"\n  … and {len(violations) - 40} more" if len(violations) > 40 else ""
        raise InvariantViolation(f"{len(violations)} {what} violated:\n  {shown}{more}")
