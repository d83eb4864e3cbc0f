"""The nginx deployment example (examples/deploy/nginx) in front of two real masters.

Two masters on one PostgreSQL database (127.0.0.2 and 127.0.0.3, same port),
nginx on 127.0.0.1 rendered from the shipped template, two agents whose only
master is nginx. A 40-task job runs through nginx; one master is SIGKILLed
while it runs. nginx is required: `make test` installs it
(scripts/ensure-nginx.sh); a missing nginx fails this test, it never skips.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import pg
from herder.api_models import JobSubmit, JobView
from herder.client import HerderClient
from herder.localfarm import LocalFarm, free_port

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "examples" / "deploy" / "nginx" / "herder.conf.template"
HOSTS = ["127.0.0.2", "127.0.0.3"]
TASKS = 40

pytestmark = pytest.mark.postgres


def find_nginx() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
    )
    if found is None:
        pytest.fail(
            "nginx was not found at /usr/sbin/nginx or on PATH. Install it: "
            "`bash scripts/ensure-nginx.sh` (what `make test` runs) or `apt-get install nginx`.",
            pytrace=False,
        )
    return found


def render(prefix: Path, listen: str, upstreams: list[str]) -> Path:
    """Render the template as docs/deployment.md tells users to."""
    for sub in ("logs", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    servers = "\n        ".join(f"server {u} max_fails=1 fail_timeout=5s;" for u in upstreams)
    # Workers of a root-started nginx switch to the template's user; pytest's
    # tmp dirs are private to the user running the tests, so the workers stay
    # that user (root when the tests run as root, as `make test` does here).
    user = pwd.getpwuid(os.geteuid()).pw_name
    text = TEMPLATE.read_text()
    for key, value in {
        "@PREFIX@": str(prefix),
        "@LISTEN@": listen,
        "@UPSTREAMS@": servers,
        "@USER@": user,
    }.items():
        assert key in text, f"{key} missing from {TEMPLATE}"
        text = text.replace(key, value)
    assert "@" not in re.sub(r"#.*", "", text), "unrendered placeholder left"
    conf = prefix / "herder.conf"
    conf.write_text(text)
    return conf


@dataclass
class Nginx:
    binary: str
    conf: Path
    prefix: Path
    url: str
    popen: subprocess.Popen[bytes] | None = None

    def argv(self, *extra: str) -> list[str]:
        return [
            self.binary,
            "-c",
            str(self.conf),
            "-p",
            str(self.prefix) + "/",
            "-e",
            str(self.prefix / "logs" / "error.log"),
            *extra,
        ]

    def start(self, wait: float = 15.0) -> None:
        check = subprocess.run(self.argv("-t"), capture_output=True, text=True, check=False)
        assert check.returncode == 0, f"nginx -t rejected the rendered template:\n{check.stderr}"
        out = open(self.prefix / "logs" / "stdout.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            self.popen = subprocess.Popen(
                self.argv(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            out.close()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(f"nginx exited {self.popen.returncode}:\n{self.log_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/api/v1/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.05)
        raise AssertionError(f"nginx at {self.url} not answering after {wait}s:\n{self.log_text()}")

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)  # fast shutdown: long-polls need not finish
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)

    def log_text(self) -> str:
        parts = []
        for name in ("error.log", "stdout.log"):
            with contextlib.suppress(OSError):
                parts.append((self.prefix / "logs" / name).read_text(errors="replace"))
        return "\n".join(parts)[-4000:]

    def access_log(self) -> str:
        return (self.prefix / "logs" / "access.log").read_text(errors="replace")


def _port_free_on(port: int, hosts: list[str]) -> bool:
    for host in hosts:
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def requests_total(url: str) -> int:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    match = re.search(r"^herder_requests_total (\d+)", text, re.M)
    assert match, text
    return int(match.group(1))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def nginx_farm(pg_dsn: str, tmp_path: Path) -> Iterator[tuple[list[LocalFarm], Nginx, LocalFarm]]:
    binary = find_nginx()
    db_url = pg.create_database(pg_dsn)
    port = next(p for p in (free_port(HOSTS[0]) for _ in range(50)) if _port_free_on(p, HOSTS))
    masters = [
        LocalFarm(
            db_url=db_url,
            host=h,
            port=port,
            workdir=tmp_path / f"master-{h}",
            lease_s=10,
            ack_timeout_s=5,
        )
        for h in HOSTS
    ]
    nginx_port = free_port("127.0.0.1")
    nginx = Nginx(
        binary,
        render(tmp_path / "nginx", f"127.0.0.1:{nginx_port}", [f"{h}:{port}" for h in HOSTS]),
        tmp_path / "nginx",
        f"http://127.0.0.1:{nginx_port}",
    )
    # Agents only: their "farm" URL is nginx, so `--master` is the nginx URL.
    agents = LocalFarm(
        db_url=db_url, host="127.0.0.1", port=nginx_port, workdir=tmp_path / "agents"
    )
    try:
        for m in masters:  # one after the other: the first one migrates the database
            m.start_master()
        nginx.start()
        yield masters, nginx, agents
    finally:
        agents.stop()  # agents first: they long-poll through nginx
        nginx.stop()
        for m in masters:
            m.stop()
        with contextlib.suppress(Exception):
            pg.drop_database(pg_dsn, db_url)


def wait_job(client: HerderClient, job_id: int, timeout: float) -> JobView:
    deadline = time.monotonic() + timeout
    job = client.get_job(job_id)
    while job.state not in ("succeeded", "failed", "cancelled"):
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job.state} after {timeout}s: {job.counts}")
        time.sleep(0.1)
        job = client.get_job(job_id)
    return job


def test_job_survives_a_master_killed_behind_nginx(
    nginx_farm: tuple[list[LocalFarm], Nginx, LocalFarm],
) -> None:
    masters, nginx, agents = nginx_farm
    before = [requests_total(m.url) for m in masters]

    agents.start_agent(slots=3, name="a1")
    agents.start_agent(slots=3, name="a2")
    agents.wait_agents(2)
    for proc in agents.agents:
        assert proc.argv[proc.argv.index("--master") + 1] == nginx.url

    expected = {i: f"task {i} of {TASKS}\n".encode() * (i + 1) for i in range(TASKS)}
    spec = JobSubmit.model_validate(
        {
            "name": "behind-nginx",
            "idempotency_key": "nginx-test-job",
            "stages": [
                {
                    "name": "work",
                    "tasks": [
                        {
                            "name": f"t{i}",
                            "command": f"sleep 0.3; for n in $(seq {i + 1}); do echo 'task {i} of {TASKS}'; done > out{i}.txt",
                        }
                        for i in range(TASKS)
                    ],
                }
            ],
        }
    )
    with HerderClient(nginx.url, timeout=10) as client:
        job = client.submit_job(spec)

        # Let part of the job run, so both masters have served its requests.
        deadline = time.monotonic() + 30
        while True:
            counts = client.get_job(job.id).counts
            if counts.get("succeeded", 0) >= 8:
                break
            assert time.monotonic() < deadline, f"job not progressing: {counts}"
            time.sleep(0.05)
        served = [requests_total(m.url) - b - 1 for m, b in zip(masters, before, strict=True)]
        assert all(n >= 5 for n in served), (
            f"requests through nginx per master before the kill: {served}"
        )

        victim, survivor = masters
        assert victim.master is not None and survivor.master is not None
        victim.master.kill9()
        killed_at = client.get_job(job.id).counts

        job = wait_job(client, job.id, timeout=40)
        assert job.state == "succeeded", job.model_dump_json(indent=1)[:3000]
        assert killed_at.get("succeeded", 0) < TASKS, (
            "the job finished before the kill: nothing tested"
        )

        (stage,) = job.stages
        assert len(stage.tasks) == TASKS
        for task in stage.tasks:
            assert task.name is not None
            i = int(task.name[1:])
            assert task.state == "succeeded" and task.exit_code == 0, task
            ok = [a for a in task.attempts if a.state == "succeeded"]
            assert len(ok) == 1, f"{task.name}: {[(a.id, a.state) for a in task.attempts]}"
            data = expected[i]
            assert [(o.path, o.digest, o.size) for o in ok[0].outputs] == [
                (f"out{i}.txt", sha(data), len(data))
            ]
            assert client.get_blob(sha(data)) == data  # through nginx, from the survivor

    assert not victim.master.alive()
    assert survivor.master.alive()
    assert requests_total(survivor.url) > before[1] + served[1]
    # nginx spread requests over both masters (its log names the one that answered).
    log = nginx.access_log()
    for m in masters:
        assert f"upstream={m.host}:{m.port}" in log, log[-3000:]
    for proc in [survivor.master, *agents.agents]:
        assert "Traceback" not in proc.log_text(), proc.log_text()[-3000:]
