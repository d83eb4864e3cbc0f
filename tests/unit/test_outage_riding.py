"""herder.client.outage: waiting out master outages with a fake transport and a fake clock.

The request loop (``RequestLoop._request``) is driven through httpx.MockTransport;
time is a fake clock that the injected ``sleep`` advances, so backoff sequences,
deadlines and announcements are checked exactly and instantly.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from herder.api_models import JobSubmit
from herder.client import (
    HerderClient,
    HerderClientError,
    MasterOutageTimeout,
    NoMasterAvailable,
    OutagePolicy,
    RequestOutcomeUnknown,
)
from herder.client.errors import AttemptRecord
from herder.client.outage import (
    ClientClosed,
    OutageWatch,
    format_duration,
    gave_up_message,
    parse_duration,
    resolve_master_timeout,
    tried_summary,
)
from waiting import wait_for

Handler = Callable[[httpx.Request], httpx.Response]


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, delay: float) -> None:
        assert delay >= 0
        self.sleeps.append(delay)
        self.now += delay


class MaxRandom(random.Random):
    """Full jitter at its top: every delay is the backoff's ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Masters:
    """Fake masters by host: a handler each, or down (connection refused); calls recorded."""

    def __init__(self, **handlers: Handler | None) -> None:
        self.handlers = dict(handlers)
        self.calls: list[tuple[str, str, str]] = []
        self.bodies: list[bytes] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.calls.append((host, request.method, request.url.path))
        self.bodies.append(request.content)
        handler = self.handlers.get(host)
        if handler is None:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        return handler(request)


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"status": "ok"})


def client_for(
    masters: Masters,
    t: FakeTime,
    urls: list[str] | None = None,
    *,
    timeout_s: float = 300.0,
    lines: list[str] | None = None,
    **kw: Any,
) -> HerderClient:
    policy = OutagePolicy(
        timeout_s=timeout_s,
        backoff_base_s=0.2,
        backoff_cap_s=3.0,
        announce=(lines.append if lines is not None else None),
        clock=t.clock,
        sleep=t.sleep,
        rng=MaxRandom(),
    )
    return HerderClient(
        urls or [f"http://{h}" for h in masters.handlers],
        transport=httpx.MockTransport(masters),
        outage=policy,
        **kw,
    )


def down_for(rounds: int, then: Handler, calls: list[int]) -> Handler:
    """Refuses the first ``rounds`` requests, then answers with ``then``."""

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) <= rounds:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        return then(request)

    return handler


# --------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("90", 90.0),
        ("1.5", 1.5),
        ("90s", 90.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        (" 2M ", 120.0),
        ("1m30s", 90.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "5x", "-3", "m5", "5m-1s", "inf", "nan", "1e999"])
def test_parse_duration_refuses_what_is_not_a_duration(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (3, "3s"), (7.24, "7.2s"), (59.9, "59.9s"), (300, "5m0s"), (3723, "1h2m3s")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_master_timeout_comes_from_the_option_then_the_environment_then_the_default() -> None:
    env = {"HERDER_MASTER_TIMEOUT": "90s"}
    assert resolve_master_timeout("3s", env) == 3.0
    assert resolve_master_timeout(None, env) == 90.0
    assert resolve_master_timeout(None, {}) == 300.0
    assert resolve_master_timeout(None, {"HERDER_MASTER_TIMEOUT": "  "}) == 300.0
    with pytest.raises(ValueError, match=r"^--master-timeout: 'soon' is not a duration"):
        resolve_master_timeout("soon", env)
    with pytest.raises(ValueError, match=r"^HERDER_MASTER_TIMEOUT: '-1' is not a duration"):
        resolve_master_timeout(None, {"HERDER_MASTER_TIMEOUT": "-1"})


def test_policy_refuses_a_negative_timeout() -> None:
    with pytest.raises(ValueError, match="master timeout"):
        OutagePolicy(timeout_s=-1)


# ------------------------------------------------------------ riding it out


def test_an_outage_is_waited_out_with_capped_backoff_and_announced_once() -> None:
    t = FakeTime()
    calls: list[int] = []
    masters = Masters(m1=down_for(7, ok, calls))
    lines: list[str] = []
    with client_for(masters, t, lines=lines) as client:
        assert client.health() == {"status": "ok"}
    # Each round tries m1 and retries nothing else; full jitter at its top is the
    # ceiling: 0.2 doubling up to the 3 s cap.
    assert t.sleeps == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.0, 3.0, 3.0])
    assert lines == [
        "herder: lost the master at http://m1 (connection refused); "
        "waiting up to 5m0s for a master…",
        "herder: master http://m1 is back after 12s",
    ]
    assert client.outage is not None and client.outage.outages == 1


def test_full_jitter_draws_below_the_ceiling() -> None:
    t = FakeTime()
    calls: list[int] = []
    masters = Masters(m1=down_for(6, ok, calls))
    policy = OutagePolicy(clock=t.clock, sleep=t.sleep, rng=random.Random(7))
    with HerderClient(["http://m1"], transport=httpx.MockTransport(masters), outage=policy) as c:
        c.health()
    ceilings = [0.2, 0.4, 0.8, 1.6, 3.0, 3.0]
    assert len(t.sleeps) == len(ceilings)
    assert all(0 <= s <= c for s, c in zip(t.sleeps, ceilings, strict=True))
    assert len(set(t.sleeps)) == len(t.sleeps)  # drawn, not fixed


def test_the_deadline_bounds_the_wait_and_names_every_master_tried() -> None:
    t = FakeTime()

    def black_hole(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out", request=request)

    masters = Masters(m1=None, m2=black_hole)
    lines: list[str] = []
    with (
        client_for(masters, t, ["http://m1", "http://m2"], timeout_s=2.5, lines=lines) as client,
        pytest.raises(MasterOutageTimeout) as info,
    ):
        client.get_job(7)
    exc = info.value
    # 0.2, 0.4, 0.8, then 1.6 cut to what is left of the deadline.
    assert t.sleeps == pytest.approx([0.2, 0.4, 0.8, 1.1])
    assert exc.waited == 2.5
    assert len(lines) == 1 and "waiting up to 2.5s" in lines[0]
    msg = gave_up_message(exc, job_id=7, master="http://m1,http://m2")
    assert msg == (
        "herder: no master answered for 2.5s (tried: http://m1 refused, http://m2 timeout); "
        "job 7 goes on in the farm — follow it with "
        "'herder status 7 --master http://m1,http://m2'"
    )
    # It is still a NoMasterAvailable, for callers that catch that.
    assert isinstance(exc, NoMasterAvailable)


def test_timeout_zero_fails_at_once_without_waiting_or_announcing() -> None:
    t = FakeTime()
    lines: list[str] = []
    masters = Masters(m1=None)
    with (
        client_for(masters, t, timeout_s=0, lines=lines) as client,
        pytest.raises(MasterOutageTimeout) as info,
    ):
        client.health()
    assert t.sleeps == [] and lines == []
    assert info.value.waited == 0.0
    assert gave_up_message(info.value) == "herder: no master answered (tried: http://m1 refused)"


def test_without_a_policy_the_client_fails_at_once_as_the_agent_expects() -> None:
    masters = Masters(m1=None)
    with HerderClient(["http://m1"], transport=httpx.MockTransport(masters)) as client:
        assert client.outage is None
        with pytest.raises(NoMasterAvailable) as info:
            client.health()
    assert not isinstance(info.value, MasterOutageTimeout)
    assert len(masters.calls) == 1  # one round (a dead master is not tried again), no waiting


def test_busy_masters_are_waited_for_at_least_their_retry_after() -> None:
    t = FakeTime()
    state = {"n": 0}

    def busy_then_ok(request: httpx.Request) -> httpx.Response:
        state["n"] += 1
        if state["n"] <= 2:  # both tries of the first round (the second with priority)
            return httpx.Response(
                503, json={"error": "busy", "message": "swamped"}, headers={"Retry-After": "2"}
            )
        return ok(request)

    lines: list[str] = []
    with client_for(Masters(m1=busy_then_ok), t, lines=lines) as client:
        client.health()
    assert t.sleeps == [2.0]
    assert lines[0].startswith("herder: lost the master at http://m1 (busy)")


def test_a_master_remembered_from_before_the_outage_is_tried_during_it() -> None:
    """The directory named m2 while m1 was up; with m1 down nobody can list it any more."""
    t = FakeTime()
    masters = Masters(m1=ok, m2=ok)

    class Directory:
        listed = ["http://m1", "http://m2"]

        def candidates(self) -> list[str]:
            return list(self.listed)

    directory = Directory()
    lines: list[str] = []
    with client_for(masters, t, ["http://m1"], lines=lines, discovery=directory) as client:
        client.health()
        masters.handlers["m1"] = None
        directory.listed = ["http://m1"]
        # The first round knows only m1 (refused); the next one tries m2 too.
        assert client.health() == {"status": "ok"}
    assert [c[0] for c in masters.calls] == ["m1", "m1", "m1", "m2"]
    assert lines[-1].startswith("herder: master http://m2 is back after")


def test_an_error_answer_ends_the_outage_and_is_not_retried() -> None:
    t = FakeTime()
    calls: list[int] = []

    def missing(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": "not_found", "message": "no job 9"})

    lines: list[str] = []
    client = client_for(Masters(m1=down_for(2, missing, calls)), t, lines=lines)
    with client, pytest.raises(HerderClientError, match="no job 9"):
        client.get_job(9)
    assert len(calls) == 3 and len(lines) == 2 and "is back" in lines[1]


# ------------------------------------------------- nothing done twice


def _job(job_id: int = 7) -> dict[str, Any]:
    now = "2024-05-01T12:00:00Z"
    return {
        "id": job_id,
        "href": f"/api/v1/jobs/{job_id}",
        "name": "b",
        "owner": None,
        "pool": "default",
        "priority": 0,
        "state": "queued",
        "idempotency_key": None,
        "created_at": now,
        "updated_at": now,
        "finished_at": None,
        "counts": {},
        "stages": [],
    }


def _spec(key: str | None = None) -> JobSubmit:
    return JobSubmit.model_validate(
        {
            "name": "b",
            "idempotency_key": key,
            "stages": [{"name": "s", "tasks": [{"command": "x"}]}],
        }
    )


def test_a_keyless_submission_gets_one_key_and_its_resend_carries_it() -> None:
    t = FakeTime()
    seen: list[str] = []

    def answer_lost_once(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content)["idempotency_key"])
        if len(seen) == 1:
            raise httpx.ReadError("connection reset by peer", request=request)
        return httpx.Response(200, json=_job())

    with client_for(Masters(m1=answer_lost_once), t) as client:
        assert client.submit_job(_spec()).id == 7
    assert len(seen) == 2 and seen[0] == seen[1] and seen[0].startswith("client-")


def test_a_lost_answer_to_a_non_idempotent_request_is_never_resent() -> None:
    t = FakeTime()
    masters = Masters()

    def lost(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("connection reset by peer", request=request)

    masters.handlers = {"m1": lost, "m2": ok}
    with client_for(masters, t) as client, pytest.raises(RequestOutcomeUnknown):
        client._request("POST", "/attempts/1/log", json={"x": 1}, idempotent=False)
    assert masters.calls == [("m1", "POST", "/api/v1/attempts/1/log")]
    assert t.sleeps == []


def test_a_non_idempotent_request_that_reached_no_master_is_sent_after_the_wait() -> None:
    t = FakeTime()
    calls: list[int] = []
    got: list[bytes] = []

    def record(request: httpx.Request) -> httpx.Response:
        got.append(request.content)
        return httpx.Response(200, json={})

    with client_for(Masters(m1=down_for(3, record, calls)), t) as client:
        client._request("POST", "/attempts/1/log", json={"x": 1}, idempotent=False)
    assert got == [b'{"x":1}']  # refused connections carried nothing: it arrived once


# ---------------------------------------------------------- blob bodies


class _CutStream(httpx.SyncByteStream):
    def __init__(self, head: bytes) -> None:
        self.head = head

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        raise httpx.ReadError("connection reset mid-body")


def test_a_blob_body_cut_midway_is_fetched_again_and_verified(tmp_path: Path) -> None:
    t = FakeTime()
    data = bytes(range(256)) * 512
    digest = hashlib.sha256(data).hexdigest()
    answers = [
        lambda: httpx.Response(200, stream=_CutStream(data[:1000])),
        lambda: "down",
        lambda: httpx.Response(200, content=data),
    ]

    def blob(request: httpx.Request) -> httpx.Response:
        answer = answers.pop(0)()
        if answer == "down":
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        assert isinstance(answer, httpx.Response)
        return answer

    lines: list[str] = []
    dest = tmp_path / "out" / "big.bin"
    with client_for(Masters(m1=blob), t, lines=lines) as client:
        assert client.download_blob(digest, dest, mode=0o640) == len(data)
    assert dest.read_bytes() == data
    assert dest.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in dest.parent.iterdir()] == ["big.bin"]  # no temp file left
    assert len(lines) == 2  # the refused connection after the cut was an outage


def test_without_a_policy_a_cut_body_is_an_error_and_leaves_nothing(tmp_path: Path) -> None:
    def blob(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=_CutStream(b"partial"))

    dest = tmp_path / "x.bin"
    client = HerderClient(["http://m1"], transport=httpx.MockTransport(Masters(m1=blob)))
    with client, pytest.raises(HerderClientError, match="interrupted"):
        client.download_blob("a" * 64, dest)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------ the shared watch


def test_the_watch_announces_one_outage_once_for_every_thread() -> None:
    t = FakeTime()
    lines: list[str] = []
    watch = OutageWatch(OutagePolicy(timeout_s=10, announce=lines.append, clock=t.clock))
    failed = NoMasterAvailable(
        "GET", "/api/v1/x", [AttemptRecord("http://m1", "unreachable", "Connection refused", False)]
    )
    b1, b2 = watch.backoff(), watch.backoff()
    watch.next_wait(failed, b1)
    t.now += 4
    watch.next_wait(failed, b2)  # a second thread, same outage: same deadline
    assert watch.remaining() == pytest.approx(6.0)
    watch.back("http://m1")
    watch.back("http://m1")
    assert len(lines) == 2 and lines[1] == "herder: master http://m1 is back after 4s"
    watch.next_wait(failed, b1)  # a new outage starts its own deadline
    assert watch.remaining() == pytest.approx(10.0) and len(lines) == 3


def test_tried_summary_keeps_each_master_once_with_its_last_outcome() -> None:
    attempts = [
        AttemptRecord(
            "http://a", "unreachable", "ConnectError: [Errno 111] Connection refused", False
        ),
        AttemptRecord("http://b", "broken", "ReadError: connection reset by peer", False),
        AttemptRecord("http://a", "timeout", "ConnectTimeout: timed out", True),
        AttemptRecord("http://c", "busy", "swamped", True),
    ]
    assert tried_summary(attempts) == "http://b reset, http://a timeout, http://c busy"


def test_closing_the_client_wakes_a_request_waiting_for_a_master() -> None:
    masters = Masters(m1=None)
    client = HerderClient(["http://m1"], transport=httpx.MockTransport(masters), master_timeout=60)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            client.health()
        except BaseException as exc:
            errors.append(exc)

    th = threading.Thread(target=call)
    th.start()
    assert client.outage is not None
    watch = client.outage
    wait_for(lambda: watch.in_outage, 5, "the request to start waiting")
    client.close()
    th.join(5)
    assert not th.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ClientClosed)
