"""A client that dies in the middle of an upload is not an unhandled exception.

Found by the kill storm: an agent killed while it uploads an output blob
leaves the master reading a body that never completes. ``request.body()``
raises ``starlette.requests.ClientDisconnect``, the catch-all handler counts
it in ``herder_unhandled_exceptions_total`` and logs ``event=unhandled_exception``,
and uvicorn logs a full traceback. A peer going away is an ordinary event
for a server (nobody is left to answer): it must not show up as a crash.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest
from chaoslib import sha

from herder.localfarm import LocalFarm
from waiting import metric


def unhandled(url: str) -> int:
    return int(metric(url, "herder_unhandled_exceptions_total"))


@pytest.mark.timeout(60)
def test_upload_cut_short_by_a_dead_client(tmp_path: Path) -> None:
    farm = LocalFarm(workdir=tmp_path / "farm", log_level="info")
    try:
        farm.start_master()
        data = b"x" * 100_000
        with socket.create_connection((farm.host, farm.port), timeout=5) as s:
            s.sendall(
                f"PUT /api/v1/blobs/{sha(data)} HTTP/1.1\r\nHost: x\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                + data[:1000]
            )
            time.sleep(0.3)
        time.sleep(1.0)
        assert httpx.get(f"{farm.url}/api/v1/health", timeout=5).status_code == 200
        count = unhandled(farm.url)
        log = (tmp_path / "farm" / "master.log").read_text(errors="replace")
    finally:
        farm.stop()
    assert count == 0, f"a client disconnect counted as {count} unhandled exception(s)"
    assert "Traceback" not in log, log[log.find("Traceback") - 500 :][:3000]
