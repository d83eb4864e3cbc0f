"""Users, tokens and agents end to end (issue 11): real `herder master`, `herder agent`
and `herder` CLI processes on loopback, secure by default."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from herder.agent.credentials import TOKEN_FILE
from herder.client import ApiError, HerderClient
from herder.localfarm import LocalFarm, Proc, free_port
from herder.store import Store
from herder.store.auth import AuthStore
from storekit import job, tasks
from waiting import wait_for

API = "/api/v1"


def _secure_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["XDG_CONFIG_HOME"] = "/nonexistent"  # no token file of the user running the tests
    env.update(extra)
    return env


def herder(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "herder", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def farm(tmp_path: Path) -> Iterator[LocalFarm]:
    with LocalFarm(workdir=tmp_path / "farm", auth=True) as lf:
        lf.start_master()
        yield lf


def _user_token(farm: LocalFarm, name: str, role: str) -> str:
    assert farm.db_url is not None
    with Store.open(farm.db_url, migrate=False) as store:
        auth = AuthStore(store)
        auth.add_user(name, role)
        return auth.create_token("user", user=name)[1]


def test_master_bootstraps_the_first_admin_once(tmp_path: Path) -> None:
    """`herder master` on a database without users prints an admin token once;
    without a token every API request is 401, /healthz and /metrics answer."""
    db = f"sqlite:///{tmp_path / 'h.db'}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "herder", "master", "--db", db, "--listen", f"127.0.0.1:{port}"]
    tokens: list[str] = []
    for run in range(2):
        proc = Proc(argv, tmp_path / f"master{run}.log", _secure_env())
        proc.start()
        try:
            wait_for(lambda: _status(f"{url}/healthz") == 200, 30, "master up", proc.log_text)
            log = proc.log_text()
            tokens += [w for w in log.split() if w.startswith("hdr_")]
            if run == 0:
                assert len(tokens) == 1, log
                who = httpx.get(
                    f"{url}{API}/whoami", headers={"authorization": f"Bearer {tokens[0]}"}
                )
                assert who.status_code == 200 and who.json()["user"] == "admin", who.text
                assert who.json()["role"] == "admin"
                anon = httpx.get(f"{url}{API}/jobs")
                assert anon.status_code == 401
                assert anon.headers["www-authenticate"].startswith("Bearer")
                assert anon.json()["error"] == "unauthorized"
                assert _status(f"{url}/metrics") == 200
                assert _status(f"{url}/openapi.json") == 200
            else:
                assert len(tokens) == 1, f"a second bootstrap token was printed:\n{log}"
            assert "insecure_no_auth" not in log
        finally:
            proc.stop()


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2.0).status_code
    except httpx.HTTPError:
        return 0


def test_insecure_master_says_so_and_checks_nothing(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'h.db'}"
    port = free_port()
    argv = [sys.executable, "-m", "herder", "master", "--db", db, "--listen", f"127.0.0.1:{port}"]
    proc = Proc([*argv, "--insecure-no-auth"], tmp_path / "master.log", _secure_env())
    proc.start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _status(f"{url}/healthz") == 200, 30, "master up", proc.log_text)
        assert httpx.get(f"{url}{API}/jobs").status_code == 200
        log = proc.log_text()
        assert "event=insecure_no_auth" in log and "WARNING" in log.upper(), log
        assert "hdr_" not in log  # no bootstrap token on an open master
    finally:
        proc.stop()


def test_cli_users_and_tokens_through_the_master(farm: LocalFarm, tmp_path: Path) -> None:
    assert farm.db_url is not None and farm.admin_token is not None
    # Bootstrapping straight on the database: a second admin and a token of theirs.
    env = _secure_env()
    r = herder("user", "add", "root", "--role", "admin", "--db", farm.db_url, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = herder("token", "create", "--user", "root", "--db", farm.db_url, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    root = r.stdout.strip()
    assert root.startswith("hdr_") and "shown this once" in r.stderr
    # Through the master with --token (the global option), then HERDER_TOKEN.
    m = ("--master", farm.url)
    r = herder(
        "--token", root, "user", "add", "bob", "--role", "submitter", *m, env=env, cwd=tmp_path
    )
    assert r.returncode == 0 and "user bob (submitter) added" in r.stdout, r.stderr
    tenv = _secure_env(HERDER_TOKEN=root)
    r = herder("token", "create", "--user", "bob", "--expires", "30d", *m, env=tenv, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    bob = r.stdout.strip()
    bob_id = bob.split("_")[1]
    r = herder("user", "list", *m, env=tenv, cwd=tmp_path)
    assert r.returncode == 0 and "bob\tsubmitter" in r.stdout, r.stdout
    r = herder("token", "list", *m, env=tenv, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith(bob_id))
    assert "\tuser\tbob\tactive\t" in line and "never" not in line
    assert bob not in r.stdout and bob.split("_", 2)[2] not in r.stdout  # no secret listed
    # A token file (HERDER_TOKEN_FILE) works like HERDER_TOKEN.
    tf = tmp_path / "bob.token"
    tf.write_text(bob + "\n")
    fenv = _secure_env(HERDER_TOKEN_FILE=str(tf))
    r = herder("agents", *m, env=fenv, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # A submitter is not an admin.
    r = herder("user", "list", *m, env=fenv, cwd=tmp_path)
    assert r.returncode == 1 and "forbidden" in r.stderr, (r.stdout, r.stderr)
    # Revoked through the master: refused at once by that master.
    r = herder("token", "revoke", bob_id, *m, env=tenv, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    who = httpx.get(f"{farm.url}{API}/whoami", headers={"authorization": f"Bearer {bob}"})
    assert who.status_code == 401 and who.json()["message"] == "token revoked"
    # No token at all: a clear one-line refusal.
    r = herder("user", "list", *m, env=env, cwd=tmp_path)
    assert r.returncode == 1 and "unauthorized" in r.stderr, r.stderr
    # Removing a user ends their tokens.
    r = herder(
        "user", "remove", "root", *m, env=_secure_env(HERDER_TOKEN=farm.admin_token), cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert (
        httpx.get(
            f"{farm.url}{API}/whoami", headers={"authorization": f"Bearer {root}"}
        ).status_code
        == 401
    )


def test_jobs_belong_to_who_submits_them(farm: LocalFarm) -> None:
    alice = _user_token(farm, "alice", "submitter")
    bob = _user_token(farm, "bob", "submitter")
    with (
        HerderClient(farm.url, token=alice) as a,
        HerderClient(farm.url, token=bob) as b,
        HerderClient(farm.url, token=farm.admin_token) as admin,
    ):
        mine = a.submit_job(job(tasks(1)))
        assert mine.owner == "alice"
        with pytest.raises(ApiError) as err:
            a.submit_job(job(tasks(1), owner="bob"))
        assert err.value.status == 403 and "cannot submit as another user" in err.value.message
        for op in ("cancel_job", "pause_job", "retry_job"):
            with pytest.raises(ApiError) as err:
                getattr(b, op)(mine.id)
            assert err.value.status == 403, op
        assert b.get_job(mine.id).state == "queued"  # reading is allowed
        assert a.pause_job(mine.id).state == "paused"
        assert a.resume_job(mine.id).state in ("queued", "running")
        for_bob = admin.submit_job(job(tasks(1), owner="bob"))
        assert for_bob.owner == "bob"
        assert admin.submit_job(job(tasks(1))).owner == "admin"
        assert admin.cancel_job(mine.id).state == "cancelled"
        assert b.cancel_job(for_bob.id).state == "cancelled"


def test_agent_identity_cannot_be_taken(farm: LocalFarm) -> None:
    assert farm.join_token is not None
    http = httpx.Client(base_url=farm.url, trust_env=False, timeout=10.0)

    def register(token: str, **body: object) -> httpx.Response:
        payload = {"name": "n", "hostname": "h", "slots": 1, **body}
        return http.post(
            f"{API}/agents", json=payload, headers={"authorization": f"Bearer {token}"}
        )

    first = register(farm.join_token, agent_id="render-01")
    assert first.status_code == 201, first.text
    own = first.json()["token"]
    second = register(farm.join_token)
    assert second.status_code == 201
    other = second.json()["token"]
    # The join token cannot take an id that is registered.
    r = register(farm.join_token, agent_id="render-01", slots=64)
    assert r.status_code == 403 and r.json()["error"] == "forbidden", r.text
    # Another agent's token cannot either, nor claim or heartbeat as it.
    r = register(other, agent_id="render-01", talkback_url="http://evil:1")
    assert r.status_code == 403, r.text
    hdr = {"authorization": f"Bearer {other}"}
    assert (
        http.post(f"{API}/agents/render-01/claim", json={"max_tasks": 1}, headers=hdr).status_code
        == 403
    )
    assert http.post(f"{API}/agents/render-01/heartbeat", json={}, headers=hdr).status_code == 403
    # The agent itself registers again (its id kept, no second token).
    r = register(own, slots=4)
    assert r.status_code == 200 and r.json()["id"] == "render-01" and r.json()["token"] is None
    assert r.json()["slots"] == 4
    agent = http.get(
        f"{API}/agents/render-01", headers={"authorization": f"Bearer {farm.admin_token}"}
    )
    assert agent.json()["slots"] == 4 and agent.json()["talkback_url"] is None
    # A join token does nothing else.
    jh = {"authorization": f"Bearer {farm.join_token}"}
    assert http.get(f"{API}/jobs", headers=jh).status_code == 403
    http.close()


def test_agent_joins_keeps_its_token_and_uses_it_after_a_restart(farm: LocalFarm) -> None:
    assert farm.workdir is not None and farm.db_url is not None
    submitter = _user_token(farm, "sue", "submitter")
    agent = farm.start_agent(slots=1, name="a1")
    farm.wait_agents(1)
    token_file = farm.workdir / "state-a1" / TOKEN_FILE
    wait_for(token_file.exists, 10, "agent token saved", agent.log_text)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    saved = token_file.read_text().strip()
    assert saved.startswith("hdr_") and saved != farm.join_token
    with HerderClient(farm.url, token=submitter) as c:
        one = c.submit_job(job(tasks(1)))
        wait_for(lambda: c.get_job(one.id).state == "succeeded", 30, "job 1", agent.log_text)
        agent_id = c.list_agents()[0].id
        view = c.get_job(one.id)
    # Every href the job's view advertises resolves (the attempt's used to be a 404).
    task_views = [t for st in view.stages for t in st.tasks]
    attempts = [a for t in task_views for a in t.attempts]
    assert attempts and all(a.agent_id == agent_id for a in attempts)
    hrefs = [view.href, *(t.href for t in task_views)]
    hrefs += [h for a in attempts for h in (a.href, a.log_href)]
    with httpx.Client(base_url=farm.url, headers={"authorization": f"Bearer {submitter}"}) as h:
        for href in hrefs:
            r = h.get(href)
            assert r.status_code == 200, (href, r.text)
        got = h.get(attempts[0].href).json()
        assert got["id"] == attempts[0].id and got["state"] == "succeeded"
        assert got["agent_id"] == agent_id and got["href"] == attempts[0].href
    # Restarted with neither the join token nor any other: it uses the saved one.
    farm.stop()
    farm.start_master()
    env = {k: v for k, v in farm._env().items() if k not in ("HERDER_TOKEN", "HERDER_JOIN_TOKEN")}
    env["XDG_CONFIG_HOME"] = "/nonexistent"
    agent = Proc(agent.argv, farm.workdir / "a1-again.log", env)
    agent.start()
    farm.agents.append(agent)
    with HerderClient(farm.url, token=submitter) as c:
        two = c.submit_job(job(tasks(1)))
        wait_for(lambda: c.get_job(two.id).state == "succeeded", 30, "job 2", agent.log_text)
        agents = c.list_agents()
        assert [a.id for a in agents] == [agent_id]
    assert "register_failed" not in agent.log_text()
    with Store.open(farm.db_url, migrate=False) as store:
        agent_tokens = [t for t in AuthStore(store).list_tokens() if t.kind == "agent"]
    assert [t.agent_id for t in agent_tokens] == [agent_id]


def test_herder_run_needs_no_token_and_no_port(tmp_path: Path) -> None:
    """The laptop stays zero-config: `herder run` of a Rakefile with no token anywhere
    and secure defaults builds it (its farm runs inside the `herder run` process)."""
    (tmp_path / "Rakefile").write_text("build:\n\tremote-echo built > out.txt\n")
    r = herder("run", "--plain", "Rakefile", env=_secure_env(), cwd=tmp_path)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert (tmp_path / "out.txt").read_text() == "built\n"


def test_revoked_agent_token_is_refused_and_a_restart_joins_anew(farm: LocalFarm) -> None:
    assert farm.workdir is not None and farm.db_url is not None
    agent = farm.start_agent(slots=1, name="a2")
    token_file = farm.workdir / "state-a2" / TOKEN_FILE
    wait_for(token_file.exists, 30, "agent token saved", agent.log_text)
    first = token_file.read_text().strip()
    first_id = first.split("_")[1]
    with Store.open(farm.db_url, migrate=False) as store:
        auth = AuthStore(store)
        (old,) = [t for t in auth.list_tokens() if t.kind == "agent"]
        assert old.id == first_id
        auth.revoke_token(old.id)
    # The running agent is shut out (within the master's 2 s cache) ...
    hb = {"authorization": f"Bearer {first}"}
    wait_for(
        lambda: httpx.get(f"{farm.url}{API}/whoami", headers=hb).status_code == 401,
        10,
        "revoked token refused",
    )
    farm.stop()
    farm.agents.clear()
    # ... and, restarted with its join token, joins again under a new id.
    farm.start_master()
    agent = farm.start_agent(slots=1, name="a2")
    wait_for(
        lambda: token_file.exists() and token_file.read_text().strip() != first,
        30,
        "a new agent token",
        agent.log_text,
    )
    assert "event=agent_token_refused" in agent.log_text()
    with Store.open(farm.db_url, migrate=False) as store:
        live = [t for t in AuthStore(store).list_tokens() if t.kind == "agent" and not t.revoked_at]
    assert len(live) == 1 and live[0].agent_id != old.agent_id
