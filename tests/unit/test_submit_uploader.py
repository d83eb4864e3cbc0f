"""Pure parts of two-transaction submission (issue 10): the client's continuation hook
that uploads a held job's missing inputs, and the store's helpers."""

from __future__ import annotations

import hashlib
import random
import threading
from pathlib import Path
from typing import Any

import pytest

from herder.api_models import JobSubmit
from herder.client.deferral import Continuation
from herder.client.errors import HerderClientError
from herder.client.files import InputUploader, input_sources, read_input
from herder.master.deferrals import DirectoryCache, Peer
from herder.paths import UnsafePath
from herder.store.inputs import (
    _BUCKETS,
    DEFAULT_INPUTS_TIMEOUT_S,
    INPUTS_TIMEOUT_ENV,
    bucket_of,
    inputs_timeout_from_env,
    required_digests,
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cont(missing: list[str], named: str, **kw: Any) -> Continuation:
    result = {
        "id": 7,
        "href": "/api/v1/jobs/7",
        "created": True,
        "state": "waiting",
        "missing": missing,
        "task_ids": [70],
    }
    return Continuation(
        server="http://m1:1",
        method=kw.pop("method", "PUT"),
        path=kw.pop("path", f"/api/v1/blobs/{named}"),
        body=None,
        params=None,
        alternates=("http://m1:1",),
        result=kw.pop("result", result),
    )


class Puts:
    def __init__(self) -> None:
        self.sent: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def __call__(self, digest: str, data: bytes) -> None:
        with self.lock:
            assert digest not in self.sent, "uploaded twice"
            self.sent[digest] = data


def test_uploads_the_others_and_gives_the_named_one_last(tmp_path: Path) -> None:
    blobs = [f"file {i}\n".encode() for i in range(6)]
    digests = sorted(sha(b) for b in blobs)
    by_digest = {sha(b): b for b in blobs}
    (tmp_path / "f0").write_bytes(by_digest[digests[0]])
    sources: dict[str, Any] = {d: by_digest[d] for d in digests[1:]}
    sources[digests[0]] = tmp_path / "f0"
    sources[sha(b"not missing")] = b"not missing"
    puts = Puts()
    hook = InputUploader(puts, sources)
    body = hook(cont(digests, digests[0]))
    assert body == by_digest[digests[0]]  # the loop sends it, as the continuation's request
    assert puts.sent == {d: by_digest[d] for d in digests[1:]}  # not the named, not the rest
    assert hook.held is not None and hook.held.id == 7
    assert sorted(hook.uploaded) == digests and hook.uploaded[-1] == digests[0]


def test_a_digest_without_a_source_is_a_clear_error() -> None:
    data = b"x"
    hook = InputUploader(Puts(), {sha(data): data})
    stranger = "f" * 64
    with pytest.raises(HerderClientError, match=f"job 7 waits for blob {stranger}"):
        hook(cont([sha(data), stranger], sha(data)))


def test_a_file_changed_since_it_was_hashed_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"new content")
    digest = sha(b"old content")
    puts = Puts()
    with pytest.raises(HerderClientError, match="changed since it was hashed"):
        InputUploader(puts, {digest: tmp_path / "a"})(cont([digest], digest))
    assert puts.sent == {}


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"method": "GET"}, "unexpected continuation GET"),
        ({"path": "/api/v1/jobs/7"}, "unexpected continuation PUT /api/v1/jobs/7"),
        ({"result": {"id": "seven"}}, "names no held job"),
        ({"result": None}, "names no held job"),
    ],
)
def test_an_unexpected_continuation_is_an_error(kw: dict[str, Any], fragment: str) -> None:
    digest = sha(b"a")
    with pytest.raises(HerderClientError, match=fragment):
        InputUploader(Puts(), {digest: b"a"})(cont([digest], digest, **kw))


def test_a_failed_upload_stops_the_hook() -> None:
    blobs = [b"a", b"b", b"c"]
    digests = sorted(sha(b) for b in blobs)

    def put(digest: str, data: bytes) -> None:
        raise HerderClientError("no master")

    with pytest.raises(HerderClientError, match="no master"):
        InputUploader(put, {sha(b): b for b in blobs})(cont(digests, digests[0]))


def test_read_input_checks_bytes_too() -> None:
    assert read_input(sha(b"ok"), b"ok") == b"ok"
    with pytest.raises(HerderClientError, match="the bytes given"):
        read_input(sha(b"ok"), b"not ok")


def test_input_sources_are_files_under_the_root(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.c").write_text("int a;\n")
    pairs = [("./src/a.c", "a" * 64), ("src/a.c", "a" * 64), ("gone.c", "b" * 64)]
    assert input_sources(tmp_path, pairs) == {"a" * 64: tmp_path / "src" / "a.c"}
    with pytest.raises(UnsafePath):
        input_sources(tmp_path, [("../etc/passwd", "c" * 64)])


def test_an_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(HerderClientError, match="cannot be read"):
        read_input("a" * 64, tmp_path / "nope")


def test_uploads_go_to_read_write_masters_only_permuted() -> None:
    directory = DirectoryCache("http://me:1", random.Random(4))
    directory.update(
        [
            Peer("http://rw2:1", "read-write"),
            Peer("http://ro1:1", "read-only"),
            Peer("http://rw3:1", "read-write"),
            Peer("http://ro2:1", "read-only"),
        ]
    )
    seen = {tuple(directory.writers()) for _ in range(30)}
    assert {frozenset(s) for s in seen} == {
        frozenset({"http://me:1", "http://rw2:1", "http://rw3:1"})
    }
    assert len(seen) > 1  # a fresh permutation per answer


def test_required_digests_once_each_sorted() -> None:
    d1, d2 = "b" * 64, "a" * 64
    job = JobSubmit.model_validate(
        {
            "name": "j",
            "stages": [
                {
                    "name": "s",
                    "tasks": [{"command": "x", "requires": [{"path": "p", "digest": d1}]}],
                },
                {
                    "name": "t",
                    "tasks": [
                        {
                            "command": "y",
                            "requires": [{"path": "q", "digest": d2}, {"path": "r", "digest": d1}],
                        }
                    ],
                },
            ],
        }
    )
    assert required_digests(job) == [d2, d1]


def test_buckets_spread_and_stay_in_range() -> None:
    buckets = {bucket_of(sha(str(i).encode())) for i in range(2000)}
    assert buckets == set(range(_BUCKETS))
    assert bucket_of("0" * 64) == 0


def test_inputs_timeout_from_the_environment() -> None:
    assert inputs_timeout_from_env({}) == DEFAULT_INPUTS_TIMEOUT_S
    assert inputs_timeout_from_env({INPUTS_TIMEOUT_ENV: "90"}) == 90.0
    for bad in ("0", "-1", "soon", "inf", "nan"):
        with pytest.raises(ValueError, match=f"{INPUTS_TIMEOUT_ENV}='{bad}'"):
            inputs_timeout_from_env({INPUTS_TIMEOUT_ENV: bad})


def test_hash_files_refuses_what_is_not_a_regular_file_without_blocking(tmp_path: Path) -> None:
    # A FIFO among the required files would block the read for ever.
    import os

    from herder.client.files import hash_files

    (tmp_path / "ok.txt").write_text("x")
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "dir").mkdir()
    assert hash_files(tmp_path, ["ok.txt"])[0]["ok.txt"][1] == 1
    for bad in ("pipe", "dir"):
        with pytest.raises(OSError, match="not a regular file"):
            hash_files(tmp_path, ["ok.txt", bad])
