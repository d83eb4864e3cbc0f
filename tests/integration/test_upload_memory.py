"""~1 GiB blob uploads keep a real master's memory bounded (issue 11, "Done means").

The blob is generated on the fly (1 MiB blocks, never held whole by the
test either) and streamed to a ``herder master`` process, on SQLite with a
Content-Length and chunked without one, on PostgreSQL chunked; a thread samples
the master's RSS (psutil) all along. A chunked upload past
``HERDER_MAX_BLOB_BYTES`` is refused 413 and leaves nothing behind: no blob
row, no spool file in the master's temporary directory.

Neither store holds a value of a full GiB (SQLite's SQLITE_MAX_LENGTH is
1e9 bytes, PostgreSQL's bytea just under 1 GiB), so the blob that is stored
is 950 MiB, and one of exactly 1 GiB (the default HERDER_MAX_BLOB_BYTES) is
streamed whole and then refused 413 by the store, naming its bound.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import sqlalchemy as sa

import pg
from herder.localfarm import free_port
from herder.store.blobs import PG_BLOB_MAX
from waiting import wait_for

GIB = 1 << 30
BLOCK = 1 << 20
LIMIT = GIB  # the master's HERDER_MAX_BLOB_BYTES (its default)
STORABLE = 950 * BLOCK  # what both stores hold in one value
GROWTH_MAX_MB = 100


@dataclass
class BlobMaster:
    url: str
    url_db: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    tmpdir: Path
    engine: sa.Engine

    def blob_rows(self) -> int:
        with self.engine.connect() as c:
            return int(c.execute(sa.text("SELECT count(*) FROM blobs")).scalar_one())


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('db') / 'herder.db'}"
        return
    maint = request.getfixturevalue("pg_dsn")
    url = pg.create_database(maint)
    try:
        yield url
    finally:
        pg.drop_database(maint, url)


@pytest.fixture(scope="module")
def master(db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlobMaster]:
    work = tmp_path_factory.mktemp("upload")
    tmpdir = work / "tmp"  # the master's spool files land here, and only here
    tmpdir.mkdir()
    db_url = db
    port = free_port()
    env = {
        **os.environ,
        "HERDER_MAX_BLOB_BYTES": str(LIMIT),
        "TMPDIR": str(tmpdir),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("HERDER_MASTER", None)
    log_path = work / "master.log"
    argv = [sys.executable, "-m", "herder", "master", "--db", db_url]
    argv += ["--listen", f"127.0.0.1:{port}", "--insecure-no-auth", "--log-level", "info"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, log_path.read_text()
        try:
            return httpx.get(f"{url}/api/v1/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, 30, "master healthy", lambda: log_path.read_text())
    m = BlobMaster(url, db_url, proc, log_path, tmpdir, sa.create_engine(db_url))
    try:
        yield m
    finally:
        m.engine.dispose()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def blocks(seed: bytes, total: int) -> Iterator[bytes]:
    """``total`` bytes in 1 MiB blocks, each different (no run of zeros a store could
    compress away), made as they are sent."""
    base = hashlib.sha256(seed).digest() * (BLOCK // 32)
    sent = 0
    i = 0
    while sent < total:
        block = i.to_bytes(8, "big") + base[8:]
        block = block[: total - sent]
        sent += len(block)
        i += 1
        yield block


def digest_of(seed: bytes, total: int) -> str:
    sha = hashlib.sha256()
    for block in blocks(seed, total):
        sha.update(block)
    return sha.hexdigest()


class PeakRss:
    """Samples a process's RSS every 10 ms on a thread, while in the ``with``."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.base = self.peak = self.proc.memory_info().rss
        self.samples = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.samples += 1
            self._done.wait(0.01)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 1e6


def upload(
    master: BlobMaster, seed: bytes, size: int, framing: str, digest: str | None = None
) -> tuple[httpx.Response, PeakRss]:
    digest = digest or digest_of(seed, size)
    headers = {"content-length": str(size)} if framing == "content-length" else {}
    with PeakRss(master.proc.pid) as rss:
        r = httpx.put(
            f"{master.url}/api/v1/blobs/{digest}",
            content=blocks(seed, size),
            headers=headers,
            timeout=120,
        )
    return r, rss


@pytest.mark.timeout(150)
def test_950_mib_upload_keeps_master_memory_bounded(master: BlobMaster) -> None:
    # Framing is the HTTP server's business, the same on both stores: PostgreSQL
    # (slower to write) gets the chunked upload only, to keep the file under a minute.
    sqlite = master.url_db.startswith("sqlite")
    for framing in ["content-length", "chunked"] if sqlite else ["chunked"]:
        seed = framing.encode()
        digest = digest_of(seed, STORABLE)
        r, rss = upload(master, seed, STORABLE, framing, digest)
        assert r.status_code == 201, r.text
        assert r.json()["size"] == STORABLE
        print(
            f"{framing}: master RSS {rss.base / 1e6:.0f} MB, peak {rss.peak / 1e6:.0f} MB "
            f"(+{rss.growth_mb:.0f}), {rss.samples} samples"
        )
        assert rss.samples > 10  # the upload was watched, not over before the first sample
        assert rss.growth_mb < GROWTH_MAX_MB, (framing, rss.growth_mb)
        length = "length" if sqlite else "octet_length"
        with master.engine.connect() as c:
            stored = c.execute(
                sa.text(f"SELECT size, {length}(data) FROM blobs WHERE digest = :d"),
                {"d": digest},
            ).one()
        assert tuple(stored) == (STORABLE, STORABLE)
        assert list(master.tmpdir.iterdir()) == []  # the spool file is gone


def store_max(master: BlobMaster) -> int:
    if master.url_db.startswith("sqlite"):
        return 1_000_000_000 - 4096  # SQLITE_MAX_LENGTH, less a row's other columns
    return PG_BLOB_MAX


@pytest.mark.timeout(120)
def test_1_gib_upload_is_streamed_then_refused_by_the_store(master: BlobMaster) -> None:
    before = master.blob_rows()
    r, rss = upload(master, b"gib", GIB, "chunked")
    print(f"1 GiB: master RSS +{rss.growth_mb:.0f} MB; {r.status_code} {r.text}")
    assert r.status_code == 413, r.text
    store = "SQLite" if master.url_db.startswith("sqlite") else "PostgreSQL"
    assert r.json() == {
        "error": "too_large",
        "message": f"blob of {GIB} bytes: this {store} store holds at most {store_max(master)}",
    }
    assert rss.growth_mb < GROWTH_MAX_MB, rss.growth_mb
    assert master.blob_rows() == before
    assert list(master.tmpdir.iterdir()) == []


@pytest.mark.timeout(120)
def test_chunked_upload_past_the_limit_is_413_and_stores_nothing(master: BlobMaster) -> None:
    before = master.blob_rows()
    total = LIMIT + BLOCK
    digest = "0" * 64  # never reached: the size is refused first
    with PeakRss(master.proc.pid) as rss:
        try:
            r = httpx.put(
                f"{master.url}/api/v1/blobs/{digest}",
                content=blocks(b"over", total),  # no Content-Length: chunked
                timeout=120,
            )
        except httpx.WriteError:  # pragma: no cover - a master may close before reading all
            pytest.fail("the master closed the connection instead of answering 413")
    assert r.status_code == 413, r.text
    body = r.json()
    assert body["error"] == "too_large" and str(LIMIT) in body["message"], body
    assert rss.growth_mb < GROWTH_MAX_MB, rss.growth_mb
    assert master.blob_rows() == before
    assert list(master.tmpdir.iterdir()) == []
    # announced too large: refused before a byte of the body is sent
    host, port = master.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            f"PUT /api/v1/blobs/{digest} HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Length: {total}\r\n\r\n".encode()
        )
        answer = b""
        while b"}" not in answer and (got := s.recv(65536)):  # the JSON error, whole
            answer += got
    text = answer.decode("latin-1")
    assert text.startswith("HTTP/1.1 413 "), text
    assert str(LIMIT) in text, text
    assert master.blob_rows() == before
    assert "Traceback" not in master.log_path.read_text(errors="replace")
