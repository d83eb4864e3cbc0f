"""``herder master`` processes with extra flags (read-only, admission), for the
tests of deferrals (test_readonly_masters.py, test_deferral_fairness.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx

from herder.localfarm import Proc, _herder_argv, free_port


class MasterProc:
    """One ``herder master`` subprocess on 127.0.0.1 and a free port."""

    def __init__(self, db_url: str, workdir: Path, name: str, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name
        workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.pop("HERDER_MASTER", None)
        env["PYTHONUNBUFFERED"] = "1"
        argv = [
            *_herder_argv(),
            "master",
            "--db",
            db_url,
            "--listen",
            f"127.0.0.1:{self.port}",
            "--log-level",
            "info",
            *flags,
        ]
        self.proc = Proc(argv, workdir / f"{name}.log", env)

    def start(self, wait: float = 30.0) -> MasterProc:
        self.proc.start()
        deadline = time.monotonic() + wait
        with httpx.Client(timeout=2.0, trust_env=False) as http:
            while time.monotonic() < deadline:
                if not self.proc.alive():
                    raise RuntimeError(f"{self.name} exited:\n{self.log()[-4000:]}")
                try:
                    if http.get(f"{self.url}/api/v1/health").status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} not healthy after {wait}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        self.proc.stop()

    def log(self) -> str:
        return self.proc.log_text()
