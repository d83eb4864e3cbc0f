"""Pool ACLs through a real master's HTTP API and the CLI (issue 11, seeds/002), on
SQLite and PostgreSQL: who may submit where, refused submissions write nothing."""

from __future__ import annotations

from pathlib import Path

import httpx
import sqlalchemy as sa

from aclfarm import Farm, farm, job


def _counts(db_url: str) -> tuple[int, int, int, int]:
    """Rows of jobs, stages, tasks and events: what a refused submission must not add."""
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return tuple(  # type: ignore[return-value]
                int(conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one())
                for t in ("jobs", "stages", "tasks", "events")
            )
    finally:
        engine.dispose()


def _acl(c: httpx.Client, f: Farm, pool: str) -> httpx.Response:
    return c.get(f"{f.api}/pools/{pool}/acl")


def test_acl_api_and_forbidden_submission_writes_nothing(db_url: str, tmp_path: Path) -> None:
    with farm(db_url, tmp_path) as f, httpx.Client(timeout=10) as c:
        # No ACL: everyone (today's behaviour).
        r = _acl(c, f, "render")
        assert r.status_code == 200, r.text
        assert r.json() | {"updated_at": None} == {
            "pool": "render",
            "allow": ["*"],
            "everyone": True,
            "restricted": False,
            "updated_at": None,
            "version": 0,
        }
        assert (
            c.post(f"{f.api}/jobs", json=job("free", "bob", "render", ["true"])).status_code == 201
        )

        r = c.put(f"{f.api}/pools/render/acl", json={"allow": ["carol", "alice", "alice"]})
        assert r.status_code == 200, r.text
        acl = r.json()
        assert acl["allow"] == ["alice", "carol"]  # sorted, once each
        assert acl["restricted"] is True and acl["everyone"] is False
        assert acl["version"] == 1 and acl["updated_at"]
        assert _acl(c, f, "render").json()["allow"] == ["alice", "carol"]

        before = _counts(f.db_url)
        r = c.post(f"{f.api}/jobs", json=job("nope", "bob", "render", ["true", "true"]))
        assert r.status_code == 403, r.text
        body = r.json()
        assert body["error"] == "forbidden"
        assert "pool render" in body["message"] and "owner bob" in body["message"]
        assert body["detail"] == {"pool": "render", "owner": "bob"}
        # A job without an owner is no one of the listed owners either.
        r = c.post(f"{f.api}/jobs", json=job("anon", None, "render", ["true"]))
        assert r.status_code == 403 and "owner (none)" in r.json()["message"]
        assert _counts(f.db_url) == before  # no job, stage, task nor event of either

        r = c.post(f"{f.api}/jobs", json=job("yes", "alice", "render", ["true"]))
        assert r.status_code == 201, r.text
        assert (
            c.post(f"{f.api}/jobs", json=job("elsewhere", "bob", "other", ["true"])).status_code
            == 201
        )

        pools = c.get(f"{f.api}/pools").json()
        assert pools["version"] == 1
        by = {p["name"]: p for p in pools["pools"]}
        assert by["render"]["allow"] == ["alice", "carol"] and by["render"]["jobs"] == 2
        assert by["other"]["everyone"] is True and by["other"]["restricted"] is False

        # '*' lets everyone in again; [] closes the pool; DELETE goes back to no ACL.
        assert c.put(f"{f.api}/pools/render/acl", json={"allow": ["*"]}).json()["everyone"]
        assert (
            c.post(f"{f.api}/jobs", json=job("star", "bob", "render", ["true"])).status_code == 201
        )
        closed = c.put(f"{f.api}/pools/render/acl", json={"allow": []}).json()
        assert closed["allow"] == [] and not closed["everyone"]
        assert (
            c.post(f"{f.api}/jobs", json=job("closed", "alice", "render", ["true"])).status_code
            == 403
        )
        r = c.delete(f"{f.api}/pools/render/acl")
        assert r.status_code == 200 and r.json()["restricted"] is False
        assert r.json()["version"] == 4
        assert c.delete(f"{f.api}/pools/render/acl").json()["version"] == 4  # idempotent
        assert (
            c.post(f"{f.api}/jobs", json=job("open", "bob", "render", ["true"])).status_code == 201
        )

        # Events record the ACL writes (who could submit, when).
        kinds = [e["kind"] for e in c.get(f"{f.api}/events").json()["events"]]
        assert kinds.count("pool.acl_set") == 3 and kinds.count("pool.acl_clear") == 1


def test_bad_names_are_422_and_change_nothing(db_url: str, tmp_path: Path) -> None:
    with farm(db_url, tmp_path) as f, httpx.Client(timeout=10) as c:
        for bad in (["a,b"], [""], [" alice"], ["x" * 201], ["tab\there"], "alice", [3]):
            r = c.put(f"{f.api}/pools/render/acl", json={"allow": bad})
            assert r.status_code == 422, (bad, r.text)
            assert r.json()["error"] == "invalid_request"
        assert (
            c.put(f"{f.api}/pools/render/acl", json={"allow": ["a"], "deny": []}).status_code == 422
        )
        assert c.put(f"{f.api}/pools/render/acl", content=b"{").status_code == 400
        assert c.get(f"{f.api}/pools/{'p' * 201}/acl").status_code == 422
        assert c.get(f"{f.api}/pools/a%01b/acl").status_code == 422
        assert c.get(f"{f.api}/pools/a%C2%85b/acl").status_code == 422  # a C1 control (NEL)
        assert _acl(c, f, "render").json()["restricted"] is False
        assert c.get(f"{f.api}/pools").json()["version"] == 0
        # Any other name works, a slash and a comma too (submissions may use them).
        r = c.put(f"{f.api}/pools/team%2Fa,b/acl", json={"allow": ["alice"]})
        assert r.status_code == 200 and r.json()["pool"] == "team/a,b"
        assert c.get(f"{f.api}/pools/team/a,b/acl").json()["allow"] == ["alice"]


def test_openapi_documents_the_pool_routes(db_url: str, tmp_path: Path) -> None:
    with farm(db_url, tmp_path) as f, httpx.Client(timeout=10) as c:
        doc = c.get(f"{f.url}/openapi.json").json()
        acl = doc["paths"]["/api/v1/pools/{pool}/acl"]
        assert set(acl) >= {"get", "put", "delete"}
        for op in acl.values():
            assert op["responses"]["200"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/PoolAclView"
            }
            assert "422" in op["responses"]
        put_body = acl["put"]["requestBody"]["content"]["application/json"]["schema"]
        assert put_body == {"$ref": "#/components/schemas/PoolAclSet"}
        assert "PoolAclSet" in doc["components"]["schemas"]
        pools = doc["paths"]["/api/v1/pools"]["get"]["responses"]["200"]
        assert pools["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/PoolList"
        }


def test_cli_pool_acl_show_set_clear(db_url: str, tmp_path: Path) -> None:
    with farm(db_url, tmp_path) as f, httpx.Client(timeout=10) as c:
        r = f.herder("pool", "acl", "show", "render")
        assert r.returncode == 0, r.stderr
        assert "pool render: everyone (no ACL)" in r.stdout
        r = f.herder("pool", "acl", "set", "render", "--allow", "bob, alice")
        assert r.returncode == 0, r.stderr
        assert "pool render: alice, bob" in r.stdout
        assert _acl(c, f, "render").json()["allow"] == ["alice", "bob"]
        r = f.herder("pool", "acl", "show", "render", "--json")
        assert r.returncode == 0 and '"allow": [\n    "alice",\n    "bob"\n  ]' in r.stdout
        r = f.herder("pool", "acl", "set", "render", "--allow", "")
        assert r.returncode == 0 and "nobody (closed)" in r.stdout
        r = f.herder("pool", "acl", "set", "render", "--allow", "al\x01ice")
        assert r.returncode == 2 and "--allow: owner contains a control character" in r.stderr
        assert _acl(c, f, "render").json()["allow"] == []  # unchanged by the refused one
        c.post(f"{f.api}/jobs", json=job("j", "bob", "other", ["true"]))
        r = f.herder("pool", "list")
        assert r.returncode == 0, r.stderr
        assert "render" in r.stdout and "nobody" in r.stdout and "other" in r.stdout
        r = f.herder("pool", "acl", "clear", "render")
        assert r.returncode == 0 and "pool render: everyone (no ACL)" in r.stdout
        assert _acl(c, f, "render").json()["restricted"] is False
