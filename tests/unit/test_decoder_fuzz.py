"""hypothesis fuzzing of the wire decoders (issue 11): whatever bytes arrive, the
answer is a model or the project's own error, never another exception.

- the master's side: ``decode_inline``, ``Completion``, ``ClaimRequest``,
  ``JobSubmit`` from any JSON (pydantic's ValidationError is a ValueError);
- the agent's side: a claim answer (``ClaimResponse`` / ``Offer``) decoded by
  the real client from whatever a master (or something pretending to be
  one) sends: a model or a ``HerderClientError``;
- ``herder.client.wire``: master URLs, error answers, Retry-After, alternates.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from herder.api_models import (
    ClaimRequest,
    ClaimResponse,
    Completion,
    JobSubmit,
    Offer,
    decode_inline,
)
from herder.client import HerderClient
from herder.client.errors import ApiError, HerderClientError
from herder.client.wire import (
    alternates_of,
    api_path,
    error_from_response,
    normalize_master_url,
    retry_after,
    split_masters,
)

FUZZ = settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])

# Any JSON value, with the awkward ones a decoder meets: huge and negative
# integers, NaN-free floats, lone surrogates and NULs in strings.
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from(["\udc00", "a\x00b", "0" * 64, "exited", "stdout", "../x", "/etc/passwd"]),
)
json_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)

DIGEST = "a" * 64
NOW = datetime(2026, 1, 1, tzinfo=UTC).isoformat()
VALID_OFFER: dict[str, Any] = {
    "attempt_id": 1,
    "token": "t",
    "task_id": 2,
    "job_id": 3,
    "href": "/api/v1/tasks/2",
    "command": ["echo", "hi"],
    "env": {},
    "requires": [{"path": "a.txt", "digest": DIGEST}],
    "outputs": None,
    "timeout_s": None,
    "lease_expires_at": NOW,
    "ack_deadline": NOW,
    "inline": {DIGEST: base64.b64encode(b"x").decode()},
}
VALID_COMPLETION: dict[str, Any] = {
    "attempt_id": 1,
    "token": "t",
    "outcome": "exited",
    "exit_code": 0,
    "outputs": [{"path": "out.txt", "digest": DIGEST, "size": 1}],
    "log": [{"stream": "stdout", "data": "hi"}],
    "blobs": {DIGEST: base64.b64encode(b"x").decode()},
}


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    """``base`` with some fields replaced by any JSON, or dropped."""
    out = dict(base)
    for key in draw(st.lists(st.sampled_from(sorted(base)), max_size=4, unique=True)):
        if draw(st.booleans()):
            out[key] = draw(json_values)
        else:
            out.pop(key)
    return out


def dumps(value: Any) -> bytes:
    # ensure_ascii: a lone surrogate travels as "\udc00", as a fuzzer sends it
    return json.dumps(value).encode()


def model_or_value_error(model: type[Any], data: bytes) -> None:
    try:
        model.model_validate_json(data)
    except ValueError as exc:  # pydantic.ValidationError included
        assert str(exc)


# ------------------------------------------------------------------ master side


@FUZZ
@given(st.dictionaries(st.text(max_size=70), st.text(max_size=40), max_size=5))
def test_decode_inline_any_dict(blobs: dict[str, str]) -> None:
    try:
        out = decode_inline(blobs)
    except ValueError as exc:
        assert str(exc).startswith("inline blob ")
        return
    assert set(out) == set(blobs)
    assert all(base64.b64encode(v).decode() == blobs[k] for k, v in out.items())


@FUZZ
@given(st.one_of(st.binary(max_size=200), json_values.map(dumps)))
def test_models_from_any_bytes(data: bytes) -> None:
    for model in (Completion, ClaimRequest, JobSubmit, Offer, ClaimResponse):
        model_or_value_error(model, data)


@FUZZ
@given(mutated(VALID_COMPLETION))
def test_completion_near_valid(body: dict[str, Any]) -> None:
    model_or_value_error(Completion, dumps(body))
    model_or_value_error(ClaimRequest, dumps({"max_tasks": 1, "completions": [body]}))


@FUZZ
@given(mutated(VALID_OFFER))
def test_offer_near_valid(body: dict[str, Any]) -> None:
    try:
        offer = Offer.model_validate_json(dumps(body))
    except ValueError:
        return
    try:
        decode_inline(offer.inline)  # what the agent does with it next
    except ValueError as exc:
        assert str(exc).startswith("inline blob ")
    for req in offer.requires:  # a path from the master is as safe as one submitted
        assert not req.path.startswith("/") and ".." not in req.path.split("/")


# ------------------------------------------------------------------ agent side


def client_answering(status: int, body: bytes, content_type: str) -> HerderClient:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body, headers={"content-type": content_type})

    return HerderClient("http://master.invalid:1", transport=httpx.MockTransport(handler))


@FUZZ
@given(
    st.sampled_from([200, 400, 401, 404, 409, 413, 422]),
    st.one_of(
        st.binary(max_size=200),
        json_values.map(dumps),
        mutated(VALID_OFFER).map(lambda o: dumps({"offers": [o], "lease_s": 30})),
        json_values.map(lambda v: dumps({"offers": [], "lease_s": v})),
    ),
    st.sampled_from(["application/json", "text/html", ""]),
)
def test_agent_decodes_any_claim_answer(status: int, body: bytes, content_type: str) -> None:
    with client_answering(status, body, content_type) as client:
        try:
            got = client.claim("agent-1", ClaimRequest(max_tasks=1))
        except HerderClientError as exc:
            assert str(exc)
            if status >= 400:
                assert isinstance(exc, ApiError) and exc.status == status
            return
    assert status == 200 and isinstance(got, ClaimResponse)


# ------------------------------------------------------------------ client.wire


@FUZZ
@given(st.one_of(st.text(max_size=60), st.lists(st.text(max_size=30), max_size=4)))
def test_master_urls_normalised_or_refused(value: str | list[str]) -> None:
    try:
        if isinstance(value, str):
            url = normalize_master_url(value)
            assert url.startswith(("http://", "https://")) and not url.endswith("/")
            assert normalize_master_url(url) == url
        else:
            assert split_masters(value)
    except ValueError as exc:  # httpx.InvalidURL is not one: it must not escape
        assert str(exc)


@FUZZ
@given(st.text(max_size=40))
def test_api_path_always_under_the_prefix(path: str) -> None:
    assert api_path(path).startswith("/api/v1")


@FUZZ
@given(
    st.integers(400, 599),
    st.one_of(st.binary(max_size=200), json_values.map(dumps)),
    st.one_of(st.none(), st.text(alphabet=st.characters(codec="latin-1"), max_size=20)),
)
def test_error_answers_always_become_api_errors(
    status: int, body: bytes, retry: str | None
) -> None:
    headers = {} if retry is None else {"retry-after": retry.encode("latin-1")}
    response = httpx.Response(status, content=body, headers=headers)
    err = error_from_response(response)
    assert isinstance(err, ApiError) and err.status == status and err.code
    after = retry_after(response)
    assert after is None or after >= 0
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    assert all(isinstance(a, str) for a in alternates_of(parsed))
