"""The client's request loop driven through every branch of seeds/004, as a table.

Each scenario scripts a few masters (``http://a``, ``http://b``, … on an
``httpx.MockTransport``), sends one request and checks the exact sequence of
(server, path, priority flag) the loop sent, then the answer or the error.
The wire format is docs/protocol-deferrals.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from herder.client import HerderClient
from herder.client.deferral import BusyRound, Continuation, LoopState
from herder.client.errors import (
    ApiError,
    HerderClientError,
    NoMasterAvailable,
    WaitDeclined,
)

Handler = Callable[[httpx.Request], httpx.Response]


def jr(status: int, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers)


def prio(request: httpx.Request) -> bool:
    return request.headers.get("Herder-Priority") == "1"


# --------------------------------------------------------------- behaviours


def ok(request: httpx.Request) -> httpx.Response:
    return jr(200, {"who": request.url.host, "path": request.url.path})


def dead(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("[Errno 111] Connection refused", request=request)


def busy(*alternates: str, queued: Any = None, retry_after: str | None = None) -> Handler:
    """Busy unless the request carries the priority flag (then it serves it)."""

    def handler(request: httpx.Request) -> httpx.Response:
        if prio(request):
            return ok(request)
        return always_busy(*alternates, queued=queued, retry_after=retry_after)(request)

    return handler


def always_busy(*alternates: Any, queued: Any = None, retry_after: str | None = None) -> Handler:
    """Busy even for a priority request (a master breaking the MUST NOT of seeds/004)."""

    def handler(request: httpx.Request) -> httpx.Response:
        body: dict[str, Any] = {"error": "busy", "message": "swamped", "alternates": alternates}
        if queued is not None:
            body["queued"] = queued
        return jr(503, body, {"Retry-After": retry_after} if retry_after else None)

    return handler


def no_service(*alternates: str, message: str = "read-only") -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        return jr(421, {"error": "no_service", "message": message, "alternates": alternates})

    return handler


def continuation(
    path: str = "/next", *alternates: str, method: str = "GET", status: int = 202
) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {
            "continuation": {"method": method, "path": path, "body": None},
            "alternates": list(alternates),
            "result": {"first": request.url.host},
        }
        return jr(status, body, {"Herder-Continuation": "1"})

    return handler


def by_path(routes: dict[str, Handler], default: Handler = ok) -> Handler:
    """Dispatch on the request's path (without /api/v1)."""

    def handler(request: httpx.Request) -> httpx.Response:
        return routes.get(request.url.path.removeprefix("/api/v1"), default)(request)

    return handler


def status(code: int) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        return jr(code, {"error": f"e{code}", "message": f"status {code}"})

    return handler


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Scenario:
    name: str
    servers: dict[str, Handler]  # host → behaviour; a host not here is dead too
    calls: list[tuple[str, str, bool]]  # (host, path without /api/v1, priority)
    masters: list[str] | None = None  # configured (default: every host, in order)
    method: str = "GET"
    path: str = "/x"
    answer: str | None = None  # host whose answer comes back
    error: type[Exception] | None = None
    says: list[str] = field(default_factory=list)  # substrings of the error message


P = "/x"
N = "/next"

SCENARIOS = [
    # --- a server handles the request: report status and exit
    Scenario("first-answers", {"a": ok, "b": ok}, [("a", P, False)], answer="a"),
    # --- cannot be contacted: dead servers
    Scenario(
        "dead-then-next", {"a": dead, "b": ok}, [("a", P, False), ("b", P, False)], answer="b"
    ),
    Scenario(
        "gateway-is-dead",
        {"a": status(502), "b": ok},
        [("a", P, False), ("b", P, False)],
        answer="b",
    ),
    Scenario(
        "all-dead-error",
        {"a": dead, "b": dead},
        [("a", P, False), ("b", P, False)],  # no priority round: nobody was busy
        error=NoMasterAvailable,
        says=[
            "no master could handle GET /api/v1/x: "
            "http://a dead (connection refused), http://b dead (connection refused)"
        ],
    ),
    # --- an error answer is an answer: no other server is asked
    Scenario("error-answer-final", {"a": status(404), "b": ok}, [("a", P, False)], error=ApiError),
    Scenario("conflict-final", {"a": status(409), "b": ok}, [("a", P, False)], error=ApiError),
    # --- busy: servers tried, then the priority round
    Scenario(
        "busy-then-next",
        {"a": busy(), "b": ok},
        [("a", P, False), ("b", P, False)],
        answer="b",
    ),
    Scenario(
        "all-busy-priority-round",
        {"a": busy(), "b": busy()},
        [("a", P, False), ("b", P, False), ("a", P, True)],
        answer="a",
    ),
    Scenario(
        "priority-round-in-tried-order",
        {"a": always_busy(), "b": busy(), "c": busy()},
        [("a", P, False), ("b", P, False), ("c", P, False), ("a", P, True), ("b", P, True)],
        answer="b",
    ),
    Scenario(
        "busy-even-with-priority-error",
        {"a": always_busy(queued=9), "b": always_busy(queued={"requests": 4, "estimate_s": 2.5})},
        [("a", P, False), ("b", P, False), ("a", P, True), ("b", P, True)],
        error=NoMasterAvailable,
        says=[
            "http://a busy with priority (swamped; 9 queued), "
            "http://b busy with priority (swamped; 4 queued, ~2.5s of work)"
        ],
    ),
    Scenario(
        "dead-not-in-priority-round",
        {"a": busy("http://b"), "b": dead},
        [("a", P, False), ("b", P, False), ("a", P, True)],
        masters=["a"],
        answer="a",
    ),
    # --- no-service: not on servers tried, never asked again for this request
    Scenario(
        "no-service-not-in-priority-round",
        {"a": no_service(), "b": busy()},
        [("a", P, False), ("b", P, False), ("b", P, True)],
        answer="b",
    ),
    Scenario(
        "no-service-alternates",
        {"a": no_service("http://b"), "b": ok},
        [("a", P, False), ("b", P, False)],
        masters=["a"],
        answer="b",
    ),
    Scenario(
        "no-service-ping-pong-ends",
        {"a": no_service("http://b"), "b": no_service("http://a")},
        [("a", P, False), ("b", P, False)],
        masters=["a"],
        error=NoMasterAvailable,
        says=["http://a no_service (read-only), http://b no_service (read-only)"],
    ),
    Scenario(
        "no-service-and-dead-error",
        {"a": no_service(), "b": dead},
        [("a", "/jobs", False), ("b", "/jobs", False)],
        method="POST",
        path="/jobs",
        error=NoMasterAvailable,
        says=[
            "no master could handle POST /api/v1/jobs: "
            "http://a no_service (read-only), http://b dead (connection refused)"
        ],
    ),
    Scenario(
        "no-service-busy-dead-error",
        {"a": no_service("http://b", "http://c"), "b": always_busy(), "c": dead},
        [("a", P, False), ("b", P, False), ("c", P, False), ("b", P, True)],
        masters=["a"],
        error=NoMasterAvailable,
        says=[
            "http://a no_service (read-only), http://b busy with priority (swamped), "
            "http://c dead (connection refused)"
        ],
    ),
    # --- alternates: only hosts no list knows join servers to try (at the end)
    Scenario(
        "new-alternates-join-at-the-end",
        {"a": busy("http://c"), "b": busy(), "c": ok},
        [("a", P, False), ("b", P, False), ("c", P, False)],
        masters=["a", "b"],
        answer="c",
    ),
    Scenario(
        "known-alternates-not-added-again",
        {
            "a": busy("http://b", "http://c"),
            "b": busy("http://a", "http://c"),
            "c": busy("http://a"),
        },
        [("a", P, False), ("b", P, False), ("c", P, False), ("a", P, True)],
        masters=["a", "b"],
        answer="a",
    ),
    Scenario(
        "dead-alternate-not-added-again",
        {"a": dead, "b": busy("http://a")},
        [("a", P, False), ("b", P, False), ("b", P, True)],
        answer="b",
    ),
    Scenario(
        "tried-alternate-not-added-again",
        {"a": busy(), "b": busy("http://a")},
        [("a", P, False), ("b", P, False), ("a", P, True)],
        answer="a",
    ),
    Scenario(
        "new-alternate-in-priority-round-gets-the-flag",
        {"a": lambda r: always_busy("http://c" if prio(r) else "http://a")(r), "c": ok},
        [("a", P, False), ("a", P, True), ("c", P, True)],
        masters=["a"],
        answer="c",
    ),
    Scenario(
        "busy-names-itself",
        {"a": busy("http://a", "a", "http://a/api/v1/")},
        [("a", P, False), ("a", P, True)],
        answer="a",
    ),
    Scenario(
        "alternates-normalized-junk-skipped",
        {"a": always_busy("ftp://x", 7, "", "c", "http://c/api/v1/", None), "c": ok},
        [("a", P, False), ("c", P, False)],
        masters=["a"],
        answer="c",
    ),
    # --- continuation: flag off, servers tried become servers to try, new command
    Scenario(
        "continuation-after-priority-resets-flag",
        {
            "a": lambda r: continuation(N, "http://c")(r) if prio(r) else busy()(r),
            "b": busy(),
            "c": ok,
        },
        [("a", P, False), ("b", P, False), ("a", P, True), ("c", N, False)],
        masters=["a", "b"],
        answer="c",
    ),
    Scenario(
        "continuation-tried-become-to-try",
        {"b": by_path({P: busy()}), "a": continuation(N)},
        [("b", P, False), ("a", P, False), ("b", N, False)],
        masters=["b", "a"],
        answer="b",
    ),
    Scenario(
        "continuation-answerer-not-readded",
        {"a": by_path({P: continuation(N)})},
        [("a", P, False)],
        error=NoMasterAvailable,
        says=[
            "no master could handle GET /api/v1/next: http://a answered the first request; "
            "its continuation named no master"
        ],
    ),
    Scenario(
        "continuation-answerer-named-itself",
        {"a": by_path({P: continuation(N, "http://a")})},
        [("a", P, False), ("a", N, False)],
        answer="a",
    ),
    Scenario(
        "continuation-alternates-first",
        {"a": by_path({P: busy()}), "b": continuation(N, "http://c", "http://a"), "c": busy()},
        [("a", P, False), ("b", P, False), ("c", N, False), ("a", N, False)],
        answer="a",
    ),
    Scenario(
        "continuation-dead-stay-dead",
        {"a": dead, "b": by_path({P: continuation(N, "http://a", "http://b")})},
        [("a", P, False), ("b", P, False), ("b", N, False)],
        answer="b",
    ),
    Scenario(
        "continuation-no-service-forgotten",
        {"a": by_path({P: no_service()}), "b": by_path({P: continuation(N, "http://a")})},
        [("a", P, False), ("b", P, False), ("a", N, False)],
        answer="a",
    ),
    Scenario(
        "continuation-then-priority-round",
        {"a": by_path({P: continuation(N, "http://b")}), "b": busy()},
        [("a", P, False), ("b", N, False), ("b", N, True)],
        masters=["a"],
        answer="b",
    ),
    Scenario(
        "continuation-chain",
        {
            "a": by_path({P: continuation("/two", "http://b"), "/three": ok}),
            "b": by_path({"/two": continuation("/three", "http://a", status=200)}),
        },
        [("a", P, False), ("b", "/two", False), ("a", "/three", False)],
        masters=["a"],
        answer="a",
    ),
    Scenario(
        "continuation-loop-stopped",
        {"a": continuation(P, "http://a")},
        [("a", P, False)] * 17,
        error=HerderClientError,
        says=["more than 16 continuations"],
    ),
]


class Recorder:
    """The scripted masters behind one MockTransport; records every request."""

    def __init__(self, servers: dict[str, Handler]) -> None:
        self.servers = servers
        self.calls: list[tuple[str, str, bool]] = []
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.calls.append((host, request.url.path.removeprefix("/api/v1"), prio(request)))
        self.requests.append(request)
        return self.servers.get(host, dead)(request)


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario(sc: Scenario) -> None:
    rec = Recorder(sc.servers)
    masters = [f"http://{h}" for h in (sc.masters or list(sc.servers))]
    with HerderClient(masters, transport=httpx.MockTransport(rec)) as client:
        if sc.error is not None:
            with pytest.raises(sc.error) as info:
                client._request(sc.method, sc.path, idempotent=True)
            for text in sc.says:
                assert text in str(info.value)
        else:
            response = client._request(sc.method, sc.path, idempotent=True)
            assert response.json()["who"] == sc.answer
    assert rec.calls == sc.calls


# ------------------------------------------------------------ beside the table


def test_no_service_keeps_no_failure_record_and_busy_does() -> None:
    rec = Recorder({"a": no_service(), "b": busy(), "c": dead})
    with HerderClient(
        ["http://a", "http://b", "http://c"], transport=httpx.MockTransport(rec)
    ) as c:
        c._request("GET", "/x", idempotent=True)
        assert [(f.url, f.kind) for f in c.failures] == [
            ("http://b", "busy"),
            ("http://c", "unreachable"),
        ]
        assert c.preferred == "http://b"


def test_retry_after_is_the_smallest_seen() -> None:
    rec = Recorder({"a": always_busy(retry_after="7"), "b": always_busy(retry_after="2.5")})
    client = HerderClient(["http://a", "http://b"], transport=httpx.MockTransport(rec))
    with client as c, pytest.raises(NoMasterAvailable) as info:
        c._request("GET", "/x", idempotent=True)
    assert info.value.retry_after == 2.5
    assert [(a.server, a.priority) for a in info.value.attempts] == [
        ("http://a", False),
        ("http://b", False),
        ("http://a", True),
        ("http://b", True),
    ]


def test_all_busy_hook_waits_with_priority() -> None:
    seen: list[BusyRound] = []

    def hook(r: BusyRound) -> bool:
        seen.append(r)
        return True

    rec = Recorder({"a": busy(queued=3), "b": dead, "c": busy()})
    masters = ["http://a", "http://b", "http://c"]
    with HerderClient(masters, transport=httpx.MockTransport(rec), on_all_busy=hook) as c:
        assert c._request("GET", "/x", idempotent=True).json()["who"] == "a"
    assert len(seen) == 1
    assert seen[0].busy == ("http://a", "http://c")
    assert seen[0].summary == (
        "http://a busy (swamped; 3 queued), http://b dead (connection refused), "
        "http://c busy (swamped)"
    )
    assert rec.calls[-1] == ("a", "/x", True)


def test_all_busy_hook_gives_up() -> None:
    rec = Recorder({"a": busy(), "b": busy()})
    with (
        HerderClient(
            ["http://a", "http://b"],
            transport=httpx.MockTransport(rec),
            on_all_busy=lambda r: False,
        ) as c,
        pytest.raises(WaitDeclined) as info,
    ):
        c._request("GET", "/x", idempotent=True)
    assert rec.calls == [("a", "/x", False), ("b", "/x", False)]  # no priority request sent
    assert str(info.value) == (
        "every master is busy for GET /api/v1/x (http://a busy (swamped), "
        "http://b busy (swamped)); not waiting"
    )


def test_all_busy_hook_not_asked_when_nobody_is_busy() -> None:
    asked: list[BusyRound] = []
    rec = Recorder({"a": no_service(), "b": dead})
    with (
        HerderClient(
            ["http://a", "http://b"],
            transport=httpx.MockTransport(rec),
            on_all_busy=lambda r: asked.append(r) is None,
        ) as c,
        pytest.raises(NoMasterAvailable) as info,
    ):
        c._request("POST", "/jobs", idempotent=False)
    assert not isinstance(info.value, WaitDeclined)
    assert asked == []


def test_wait_declined_is_not_waited_out_as_an_outage() -> None:
    # With outage riding on, a round where every master is dead waits; one where
    # the caller declined to wait for busy masters ends at once.
    rec = Recorder({"a": busy()})
    with (
        HerderClient(
            ["http://a"],
            transport=httpx.MockTransport(rec),
            master_timeout=60,
            on_all_busy=lambda r: False,
        ) as c,
        pytest.raises(WaitDeclined),
    ):
        c._request("GET", "/x", idempotent=True)
    assert rec.calls == [("a", "/x", False)]


def test_no_service_everywhere_is_not_waited_out_as_an_outage() -> None:
    rec = Recorder({"a": no_service("http://b"), "b": no_service()})
    client = HerderClient(["http://a"], transport=httpx.MockTransport(rec), master_timeout=60)
    with client as c, pytest.raises(NoMasterAvailable) as info:
        c._request("POST", "/jobs", idempotent=True)
    assert info.value.all_declined
    assert rec.calls == [("a", "/jobs", False), ("b", "/jobs", False)]


def test_continuation_hook_sees_result_and_gives_the_body() -> None:
    digest = "ab" * 32
    seen: list[Continuation] = []

    def a(request: httpx.Request) -> httpx.Response:
        return jr(
            201,
            {
                "continuation": {"method": "put", "path": f"/blobs/{digest}", "body": None},
                "alternates": ["http://b"],
                "result": {"id": 7},
            },
            {"Herder-Continuation": "1"},
        )

    def b(request: httpx.Request) -> httpx.Response:
        assert request.method == "PUT"
        assert request.headers["content-type"] == "application/octet-stream"
        return jr(201, {"digest": digest, "size": len(request.content)})

    def hook(cont: Continuation) -> bytes:
        seen.append(cont)
        return b"the bytes"

    rec = Recorder({"a": a, "b": b})
    with HerderClient(["http://a"], transport=httpx.MockTransport(rec)) as c:
        response = c._request(
            "POST", "/jobs", json={"name": "j"}, idempotent=False, on_continuation=hook
        )
    assert response.json() == {"digest": digest, "size": 9}
    assert [(s.server, s.method, s.path, s.result) for s in seen] == [
        ("http://a", "PUT", f"/blobs/{digest}", {"id": 7})
    ]
    assert rec.calls == [("a", "/jobs", False), ("b", f"/blobs/{digest}", False)]


def test_continuation_json_body_and_params_are_sent() -> None:
    def a(request: httpx.Request) -> httpx.Response:
        return jr(
            200,
            {
                # the accepted spelling "next" for "continuation"
                "next": {
                    "method": "POST",
                    "path": "/api/v1/blobs/missing",
                    "body": {"digests": ["x"]},
                    "params": {"handoff": "1"},
                },
                "alternates": ["http://a"],
            },
            {"Herder-Continuation": "1"},
        )

    rec = Recorder({"a": by_path({"/jobs": a})})
    with HerderClient(["http://a"], transport=httpx.MockTransport(rec)) as c:
        c._request("POST", "/jobs", json={}, idempotent=False)
    last = rec.requests[-1]
    assert (last.method, last.url.path, last.url.params["handoff"]) == (
        "POST",
        "/api/v1/blobs/missing",
        "1",
    )
    assert json.loads(last.content) == {"digests": ["x"]}
    assert last.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    "body",
    [
        {"alternates": []},
        {"continuation": {"method": "GET"}},
        {"continuation": {"path": "/x", "method": "G T"}},
        {"continuation": {"path": "/x", "params": {"a": [1]}}},
        "not an object",
    ],
)
def test_malformed_continuation_is_a_clear_error(body: Any) -> None:
    rec = Recorder({"a": lambda r: jr(200, body, {"Herder-Continuation": "1"})})
    client = HerderClient(["http://a"], transport=httpx.MockTransport(rec))
    with client as c, pytest.raises(HerderClientError, match="GET /api/v1/x: malformed"):
        c._request("GET", "/x", idempotent=True)


def test_continuation_of_a_streamed_request_streams_the_last_answer() -> None:
    data = b"x" * 100_000

    def a(request: httpx.Request) -> httpx.Response:
        return jr(
            200,
            {"continuation": {"path": "/blobs/d?handoff=1"}, "alternates": ["http://b"]},
            {"Herder-Continuation": "1"},
        )

    rec = Recorder({"a": a, "b": lambda r: httpx.Response(200, content=data)})
    with HerderClient(["http://a"], transport=httpx.MockTransport(rec)) as c:
        response = c._request("GET", "/blobs/d", idempotent=True, stream=True)
        try:
            assert b"".join(response.iter_bytes()) == data
        finally:
            response.close()


def test_loop_state_steps() -> None:
    # The lists themselves, step by step, for one operation.
    s = LoopState(to_try=["http://a", "http://b"])
    assert s.take() == "http://a"
    from herder.client.deferral import Deferral

    s.busy("http://a", Deferral("busy", "m", ("http://a", "http://c")))
    assert (s.to_try, s.tried) == (["http://b", "http://c"], ["http://a"])
    s.no_service(s.take(), Deferral("no_service", "ro", ("http://a", "http://d")))
    assert (s.to_try, s.declined) == (["http://c", "http://d"], ["http://b"])
    s.take()
    s.take()
    assert s.to_try == [] and not s.priority
    assert s.start_priority_round() == ["http://a"]
    assert (s.to_try, s.tried, s.priority) == (["http://a"], [], True)
