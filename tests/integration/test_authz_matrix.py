"""The authorization matrix (issue 11): every endpoint of the master's OpenAPI document,
for every kind of caller → the expected answer, on SQLite and PostgreSQL.

The expectations are this file's own table (``ALLOWED``), not the master's
rules, so a rule that drifts fails here; an endpoint the table does not know
fails the test. A real ``herder master`` process, secure by default, real HTTP.

Callers: anonymous, viewer, submitter, admin, this agent (the one the
attempt was offered to and named in the path), another agent, a join token,
an expired token, a revoked token. A caller the table allows must get past
authorization (any answer but 401, 403 and 5xx: a 404/409/422 for the
placeholder body is fine); one it does not allow gets 403; anonymous,
expired and revoked get 401 with ``WWW-Authenticate: Bearer`` and the JSON
error ``unauthorized``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from herder.localfarm import LocalFarm
from herder.store import Store
from herder.store.auth import AuthStore

CALLERS = (
    "anonymous",
    "viewer",
    "submitter",
    "admin",
    "agent",
    "other_agent",
    "join",
    "expired",
    "revoked",
)
USERS = frozenset({"viewer", "submitter", "admin"})
PUBLIC = frozenset(CALLERS)  # no token needed
ANY = USERS | {"agent", "other_agent", "join"}
SUBMIT = frozenset({"submitter", "admin"})
ADMIN = frozenset({"admin"})
UPLOAD = SUBMIT | {"agent", "other_agent"}
THIS_AGENT = frozenset({"agent", "admin"})

API = "/api/v1"
#: Who gets past authorization on each endpoint. "agent" is the agent named in the
#: path / owning the attempt; the job belongs to "submitter".
ALLOWED: dict[tuple[str, str], frozenset[str]] = {
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    ("GET", f"{API}/health"): ANY,
    ("GET", f"{API}/whoami"): ANY,
    ("GET", f"{API}/masters"): ANY,
    ("GET", f"{API}/masters/{{master_id}}"): ANY,
    ("PUT", f"{API}/masters/{{master_id}}"): ADMIN,
    ("GET", f"{API}/masters/{{master_id}}/failures"): USERS,
    ("POST", f"{API}/masters/{{master_id}}/failures"): ADMIN | {"agent", "other_agent"},
    ("POST", f"{API}/jobs"): SUBMIT,
    ("GET", f"{API}/jobs"): USERS,
    ("GET", f"{API}/jobs/{{job_id}}"): USERS,
    ("PATCH", f"{API}/jobs/{{job_id}}"): SUBMIT,
    ("POST", f"{API}/jobs/{{job_id}}/cancel"): SUBMIT,
    ("POST", f"{API}/jobs/{{job_id}}/pause"): SUBMIT,
    ("POST", f"{API}/jobs/{{job_id}}/resume"): SUBMIT,
    ("POST", f"{API}/jobs/{{job_id}}/retry"): SUBMIT,
    ("GET", f"{API}/jobs/{{job_id}}/events"): USERS,
    ("GET", f"{API}/jobs/{{job_id}}/follow"): USERS,
    ("GET", f"{API}/events"): USERS,
    ("GET", f"{API}/tasks/{{task_id}}"): USERS,
    ("GET", f"{API}/attempts/{{attempt_id}}"): USERS | {"agent"},
    ("GET", f"{API}/attempts/{{attempt_id}}/log"): USERS | {"agent"},
    ("POST", f"{API}/attempts/{{attempt_id}}/log"): THIS_AGENT,
    ("POST", f"{API}/attempts/{{attempt_id}}/ack"): THIS_AGENT,
    ("POST", f"{API}/attempts/{{attempt_id}}/complete"): THIS_AGENT,
    ("POST", f"{API}/blobs/missing"): UPLOAD,
    ("PUT", f"{API}/blobs/{{digest}}"): UPLOAD,
    ("GET", f"{API}/blobs/{{digest}}"): USERS | {"agent", "other_agent"},
    ("GET", f"{API}/agents"): USERS,
    ("POST", f"{API}/agents"): ADMIN | {"agent", "other_agent", "join"},
    ("GET", f"{API}/agents/{{agent_id}}"): USERS | {"agent"},
    ("PATCH", f"{API}/agents/{{agent_id}}"): ADMIN,
    ("POST", f"{API}/agents/{{agent_id}}/claim"): THIS_AGENT,
    ("POST", f"{API}/agents/{{agent_id}}/heartbeat"): THIS_AGENT,
    ("POST", f"{API}/agents/{{agent_id}}/drain"): ADMIN,
    ("POST", f"{API}/agents/{{agent_id}}/undrain"): ADMIN,
    ("GET", f"{API}/owners"): USERS,
    ("PUT", f"{API}/owners/{{owner}}/share"): ADMIN,
    ("GET", f"{API}/pools"): USERS,
    ("GET", f"{API}/pools/{{pool}}/acl"): USERS,
    ("PUT", f"{API}/pools/{{pool}}/acl"): ADMIN,
    ("DELETE", f"{API}/pools/{{pool}}/acl"): ADMIN,
    ("GET", f"{API}/users"): ADMIN,
    ("POST", f"{API}/users"): ADMIN,
    ("DELETE", f"{API}/users/{{name}}"): ADMIN,
    ("GET", f"{API}/tokens"): ADMIN,
    ("POST", f"{API}/tokens"): ADMIN,
    ("POST", f"{API}/tokens/{{token_id}}/revoke"): ADMIN,
}

JOB = {"name": "j", "stages": [{"name": "s", "tasks": [{"command": "true"}]}]}


@dataclass
class Farm:
    farm: LocalFarm
    http: httpx.Client
    tokens: dict[str, str | None]
    params: dict[str, str]

    def call(self, caller: str, method: str, path: str, **kw: Any) -> httpx.Response:
        token = self.tokens[caller]
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return self.http.request(method, path, headers=headers, **kw)


def _register(http: httpx.Client, join: str, name: str) -> tuple[str, str]:
    r = http.post(
        f"{API}/agents",
        json={"name": name, "hostname": "h", "slots": 1},
        headers={"authorization": f"Bearer {join}"},
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["token"].startswith("hdr_")
    return body["id"], body["token"]


@pytest.fixture
def farm(db_url: str, tmp_path: Path) -> Iterator[Farm]:
    with LocalFarm(db_url=db_url, workdir=tmp_path / "farm", auth=True) as lf:
        lf.start_master()
        assert lf.admin_token and lf.join_token
        tokens: dict[str, str | None] = {"anonymous": None, "admin": lf.admin_token}
        tokens["join"] = lf.join_token
        with Store.open(db_url, migrate=False) as store:
            auth = AuthStore(store)
            for role in ("viewer", "submitter"):
                auth.add_user(role, role)
                tokens[role] = auth.create_token("user", user=role)[1]
            auth.add_user("victim", "viewer")
            throwaway, _ = auth.create_token("user", user="victim")
            tokens["expired"] = auth.create_token("user", user="submitter", expires_s=0.5)[1]
            revoked, tokens["revoked"] = auth.create_token("user", user="admin")
            auth.revoke_token(revoked.id)
        http = httpx.Client(base_url=lf.url, timeout=30.0, trust_env=False)
        agent_id, tokens["agent"] = _register(http, lf.join_token, "a")
        _, tokens["other_agent"] = _register(http, lf.join_token, "b")
        f = Farm(lf, http, tokens, {})
        r = f.call("submitter", "POST", f"{API}/jobs", json=JOB)
        assert r.status_code == 201 and r.json()["owner"] == "submitter", r.text
        job = r.json()
        data = b"blob"
        digest = hashlib.sha256(data).hexdigest()
        assert f.call("submitter", "PUT", f"{API}/blobs/{digest}", content=data).status_code == 201
        claim = f.call("agent", "POST", f"{API}/agents/{agent_id}/claim", json={"max_tasks": 1})
        assert claim.status_code == 200 and claim.json()["offers"], claim.text
        masters = f.call("admin", "GET", f"{API}/masters").json()["masters"]
        f.params = {
            "job_id": str(job["id"]),
            "task_id": str(job["stages"][0]["tasks"][0]["id"]),
            "attempt_id": str(claim.json()["offers"][0]["attempt_id"]),
            "agent_id": agent_id,
            "master_id": masters[0]["id"],
            "digest": digest,
            "name": "victim",
            "token_id": throwaway.id,
            "owner": "submitter",
            "pool": "default",
        }
        time.sleep(0.6)  # the expired token's half second is over
        try:
            yield f
        finally:
            http.close()


def _endpoints(f: Farm) -> list[tuple[str, str]]:
    doc = f.call("anonymous", "GET", "/openapi.json").json()
    return [(m.upper(), p) for p, ops in doc["paths"].items() for m in ops]


def _fill(path: str, params: dict[str, str]) -> str:
    for name, value in params.items():
        path = path.replace(f"{{{name}}}", value)
    assert "{" not in path, f"no value for a placeholder of {path}"
    return path


def test_every_endpoint_for_every_caller(farm: Farm) -> None:
    endpoints = _endpoints(farm)
    missing = [e for e in endpoints if e not in ALLOWED]
    assert not missing, f"endpoints without an authorization rule in this test: {missing}"
    assert len(endpoints) >= 45
    wrong: list[str] = []
    for method, template in endpoints:
        path = _fill(template, farm.params)
        body: dict[str, Any] = {}
        if template.endswith("/follow"):
            body = {"params": {"wait_s": 0}}
        elif template.endswith("/claim"):
            body = {"json": {"max_tasks": 0, "wait_s": 0}}
        elif method == "PUT" and "/blobs/" in template:
            body = {"content": b"blob"}
        elif method in ("POST", "PUT", "PATCH"):
            body = {"json": {}}
        for caller in CALLERS:
            r = farm.call(caller, method, path, **body)
            allowed = caller in ALLOWED[(method, template)]
            if allowed:
                ok = r.status_code not in (401, 403) and r.status_code < 500
            elif caller in ("anonymous", "expired", "revoked"):
                ok = (
                    r.status_code == 401
                    and r.headers.get("www-authenticate", "").startswith("Bearer")
                    and r.json().get("error") == "unauthorized"
                )
            else:
                ok = r.status_code == 403 and r.json().get("error") == "forbidden"
            if not ok:
                want = "allowed" if allowed else "refused"
                wrong.append(
                    f"{caller} {method} {template}: {r.status_code} ({want}) {r.text[:200]}"
                )
    assert not wrong, "\n".join(wrong)


def test_openapi_documents_401_and_403(farm: Farm) -> None:
    doc = farm.call("anonymous", "GET", "/openapi.json").json()
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if ALLOWED[(method.upper(), path)] is PUBLIC:
                assert "security" not in op, (method, path)
            else:
                assert {"401", "403"} <= set(op["responses"]), (method, path)


def test_tampered_tokens_are_refused(farm: Farm) -> None:
    good = farm.tokens["viewer"]
    assert good is not None
    _, token_id, secret = good.split("_", 2)
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    other = farm.tokens["submitter"]
    assert other is not None
    other_id = other.split("_", 2)[1]
    variants = [
        f"hdr_{token_id}_{flipped}",  # secret changed
        f"hdr_{other_id}_{secret}",  # another token's id with this secret
        f"hdr_{'0' * 12}_{secret}",  # an id that does not exist
        good[:-3],  # cut short
        good + "x",  # lengthened
        good.replace("hdr_", "xyz_"),  # not our format
    ]
    for token in variants:
        r = farm.http.get(f"{API}/jobs", headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 401, (token, r.text)
        assert r.json()["error"] == "unauthorized"
    for header in (f"Basic {good}", good, f"Bearer  {good} extra", "Bearer"):
        r = farm.http.get(f"{API}/jobs", headers={"authorization": header})
        assert r.status_code == 401, (header, r.text)
    assert farm.call("viewer", "GET", f"{API}/jobs").status_code == 200


def test_ownership_checks_answer_bad_and_unknown_ids_cleanly(farm: Farm) -> None:
    """The rules that look up an owner never turn an odd id into a 500."""
    huge = str(2**64)
    for caller, method, path in (
        ("submitter", "POST", f"{API}/jobs/{huge}/cancel"),
        ("submitter", "PATCH", f"{API}/jobs/{huge}"),
        ("agent", "POST", f"{API}/attempts/{huge}/ack"),
        ("agent", "GET", f"{API}/attempts/{huge}"),
        ("submitter", "POST", f"{API}/jobs/-1/cancel"),
    ):
        r = farm.call(caller, method, path, json={})
        assert r.status_code == 422, (caller, path, r.text)
    for caller, method, path in (
        ("submitter", "POST", f"{API}/jobs/987654/cancel"),
        ("agent", "POST", f"{API}/attempts/987654/ack"),
        ("viewer", "GET", f"{API}/attempts/987654"),
    ):
        r = farm.call(caller, method, path, json={"token": "x"})
        assert r.status_code == 404 and r.json()["error"] == "not_found", (path, r.text)
