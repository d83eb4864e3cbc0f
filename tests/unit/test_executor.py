"""The agent's executor with real processes (no server)."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from herder.agent.execspec import ExecSpec
from herder.agent.executor import BlobCache, Executor, direct_argv
from herder.agent.procs import group_alive
from herder.api_models import RequiredFile
from herder.paths import UnsafePath


@pytest.fixture
def executor(tmp_path: Path) -> Executor:
    return Executor(tmp_path / "work", tmp_path / "blobs", kill_grace_s=0.5)


_next_id = iter(range(1, 1_000_000))


def spec(command: str | list[str], **kw: object) -> ExecSpec:
    return ExecSpec(attempt_id=next(_next_id), command=command, **kw)  # type: ignore[arg-type]


def req(cache: BlobCache, path: str, data: bytes, mode: int | None = None) -> RequiredFile:
    return RequiredFile(path=path, digest=cache.add_bytes(data), mode=mode)


def outputs_of(res) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    return {of.path: p.read_bytes() for of, p in res.outputs}


def log_text(ex) -> dict[str, str]:  # type: ignore[no-untyped-def]
    chunks, more = ex.read_logs(final=True)
    assert not more
    got = {"stdout": "", "stderr": ""}
    for c in chunks:
        got[c.stream] += c.data
    return got


# ------------------------------------------------------------------- commands


def test_direct_argv_rules() -> None:
    assert direct_argv("echo hi") == ["echo", "hi"]
    assert direct_argv("cc -DX=1 -c a.c") == ["cc", "-DX=1", "-c", "a.c"]
    for needs_shell in (
        "echo $HOME",
        "a | b",
        "x > y",
        "cd dir",
        "FOO=1 env",
        "ls *.c",
        "echo 'a b'",
        "a && b",
        "exit 3",
        "echo ~",
    ):
        assert direct_argv(needs_shell) is None, needs_shell


def test_success_with_nested_binary_outputs(executor: Executor) -> None:
    cmd = "mkdir -p out/deep && printf 'a\\000\\377b' > out/deep/bin.dat && echo top > top.txt && echo done"
    ex, res = executor.run(spec(cmd))
    assert res.outcome == "exited" and res.exit_code == 0, res
    outs = outputs_of(res)
    assert outs == {"out/deep/bin.dat": b"a\x00\xffb", "top.txt": b"top\n"}
    by_path = {of.path: of for of, _ in res.outputs}
    assert by_path["out/deep/bin.dat"].digest == hashlib.sha256(b"a\x00\xffb").hexdigest()
    assert by_path["out/deep/bin.dat"].size == 4
    assert log_text(ex)["stdout"] == "done\n"
    assert ex.work_dir == ex.sandbox / "work"
    assert (ex.sandbox / "stdout").exists() and not (ex.work_dir / "stdout").exists()
    ex.cleanup()
    assert not ex.sandbox.exists()


def test_staged_inputs_unchanged_not_reported(executor: Executor) -> None:
    cache = executor.blobs
    r1 = req(cache, "src/a.c", b"int a;\n")
    r2 = req(cache, "./b.txt", b"bee\n")
    r3 = req(cache, "run.sh", b"#!/bin/sh\necho script\n", mode=0o755)
    ex, res = executor.run(
        spec("cat src/a.c b.txt > both && ./run.sh && echo more >> b.txt", requires=[r1, r2, r3])
    )
    assert res.outcome == "exited" and res.exit_code == 0, (res, log_text(ex))
    outs = outputs_of(res)
    assert outs == {"both": b"int a;\nbee\n", "b.txt": b"bee\nmore\n"}
    assert os.stat(ex.work_dir / "run.sh").st_mode & 0o777 == 0o755
    assert log_text(ex)["stdout"] == "script\n"
    # b.txt was written in place: the cached blob must not stay corrupted
    p = cache.path(r2.digest)
    assert not p.exists() or p.read_bytes() == b"bee\n"


def test_declared_outputs_exact_and_missing(executor: Executor) -> None:
    _ex, res = executor.run(spec("echo 1 > a && echo 2 > b", outputs=["a", "missing/c"]))
    assert res.outcome == "exited" and res.exit_code == 0
    assert outputs_of(res) == {"a": b"1\n"}
    assert res.error is not None and "missing/c" in res.error


def test_symlink_outputs(executor: Executor, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("nope")
    _ex, res = executor.run(spec(f"ln -s {secret} leak && echo x > real && ln -s real inside"))
    assert res.exit_code == 0
    outs = outputs_of(res)
    assert "leak" not in outs
    assert outs == {"real": b"x\n", "inside": b"x\n"}


def test_failing_command(executor: Executor) -> None:
    ex, res = executor.run(spec("echo oops >&2; exit 3"))
    assert res.outcome == "exited"
    assert res.exit_code == 3
    assert log_text(ex)["stderr"] == "oops\n"


def test_direct_and_shell_paths(executor: Executor) -> None:
    ex, res = executor.run(spec("echo hi"))
    assert (res.exit_code, log_text(ex)["stdout"]) == (0, "hi\n")
    ex, res = executor.run(spec("echo $HOME > x", env={"HOME": "/nowhere"}))
    assert res.exit_code == 0 and outputs_of(res) == {"x": b"/nowhere\n"}
    ex, res = executor.run(spec("printf 'b\\na\\n' | sort | tr a-z A-Z"))
    assert (res.exit_code, log_text(ex)["stdout"]) == (0, "A\nB\n")
    ex, res = executor.run(spec(["sh", "-c", 'echo "$HERDER_ATTEMPT_ID $PWD"']))
    assert log_text(ex)["stdout"] == f"{ex.attempt_id} {ex.work_dir}\n"


def test_missing_program_is_127(executor: Executor) -> None:
    ex, res = executor.run(spec("no-such-program-xyz --flag"))
    assert (res.outcome, res.exit_code) == ("exited", 127)
    assert "no-such-program-xyz" in log_text(ex)["stderr"]
    ex, res = executor.run(spec(["no-such-program-xyz"]))
    assert (res.outcome, res.exit_code) == ("exited", 127)
    ex, res = executor.run(spec("no-such-program-xyz > out"))  # through the shell
    assert (res.outcome, res.exit_code) == ("exited", 127)


def test_timeout_kills_whole_group(executor: Executor) -> None:
    ex = executor.execution(spec("sleep 100 & sleep 100", timeout_s=0.5))
    t0 = time.monotonic()
    res = ex.run()
    assert res.outcome == "timeout"
    assert res.error == "timed out after 0.5s"
    assert time.monotonic() - t0 < 5
    assert ex.pgid is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(ex.pgid, 0)


def test_timeout_escalates_to_sigkill(executor: Executor) -> None:
    ex = executor.execution(
        spec(["sh", "-c", "trap '' TERM; sleep 100 & sleep 100"], timeout_s=0.3)
    )
    res = ex.run()
    assert res.outcome == "timeout"
    assert ex.pgid is not None and not group_alive(ex.pgid)


def test_background_children_killed_after_normal_exit(executor: Executor) -> None:
    ex, res = executor.run(spec("sleep 100 & echo started"))
    assert res.exit_code == 0
    assert ex.pgid is not None and not group_alive(ex.pgid)


def test_cancel_kills_group(executor: Executor) -> None:
    ex = executor.execution(spec("sleep 100 & sleep 100"))
    ex.prepare()
    assert ex.start() is None
    threading.Timer(0.2, ex.cancel, ("cancelled", "stale attempt")).start()
    res = ex.wait()
    assert res.outcome == "cancelled" and res.error == "stale attempt"
    assert ex.pgid is not None and not group_alive(ex.pgid)


def test_cancel_before_start(executor: Executor) -> None:
    ex = executor.execution(spec("echo never"))
    ex.prepare()
    ex.cancel("released", "shutting down")
    res = ex.start()
    assert res is not None and res.outcome == "released"


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../x"])
def test_unsafe_requires_rejected_by_model(bad: str) -> None:
    with pytest.raises(ValueError):
        RequiredFile(path=bad, digest="0" * 64)


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd"])
def test_unsafe_requires_rejected_by_executor(executor: Executor, bad: str) -> None:
    good = req(executor.blobs, "x", b"x")
    rf = RequiredFile.model_construct(path=bad, digest=good.digest, mode=None)
    _, res = executor.run(spec("true", requires=[rf]))
    assert res.outcome == "launch_failed"
    assert res.error is not None and "unsafe" in res.error


def test_symlink_escape_in_requires_rejected(executor: Executor, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    ex = executor.execution(spec("true"))
    ex.prepare()
    (ex.work_dir / "link").symlink_to(outside)
    for path in ("link/evil", "link/sub/evil"):
        with pytest.raises(UnsafePath, match="symlink"):
            ex._stage(req(executor.blobs, path, b"evil"))
    assert list(outside.iterdir()) == []


def test_blob_fetch_on_miss_and_bad_digest(tmp_path: Path) -> None:
    data = b"remote blob"
    digest = hashlib.sha256(data).hexdigest()
    calls: list[str] = []

    def fetch(d: str, dest: Path) -> None:
        calls.append(d)
        dest.write_bytes(data if d == digest else b"wrong")

    ex = Executor(tmp_path / "w", tmp_path / "b", fetch)
    _, res = ex.run(spec("cat in", requires=[RequiredFile(path="in", digest=digest)]))
    assert res.exit_code == 0
    _, res = ex.run(spec("cat in", requires=[RequiredFile(path="in", digest=digest)]))
    assert calls == [digest]  # cached the second time
    _, res = ex.run(spec("cat in", requires=[RequiredFile(path="in", digest="1" * 64)]))
    assert res.outcome == "launch_failed" and "wrong digest" in (res.error or "")


def test_fetch_failure_is_launch_failed(tmp_path: Path) -> None:
    def fetch(d: str, dest: Path) -> None:
        raise ConnectionError("master down")

    ex = Executor(tmp_path / "w", tmp_path / "b", fetch)
    _, res = ex.run(spec("true", requires=[RequiredFile(path="in", digest="2" * 64)]))
    assert res.outcome == "launch_failed" and "master down" in (res.error or "")


def test_log_streaming_keeps_multibyte_chars(executor: Executor) -> None:
    ex = executor.execution(spec("true"))
    ex.prepare()
    path = ex.log_paths["stdout"]
    euro = "€".encode()  # 3 bytes
    with open(path, "ab") as fh:
        fh.write(b"a" + euro[:1])
    chunks, _ = ex.read_logs()
    assert [c.data for c in chunks] == ["a"]
    with open(path, "ab") as fh:
        fh.write(euro[1:] + b"\xff!")
    chunks, _ = ex.read_logs()
    assert [c.data for c in chunks] == ["€\ufffd!"]
    chunks, _ = ex.read_logs()
    assert chunks == []
    with open(path, "ab") as fh:
        fh.write(b"x" * 10)
    chunks, more = ex.read_logs(limit=4)
    assert more and chunks[0].data == "xxxx"


def test_purge_stale(executor: Executor) -> None:
    (executor.work_root / "a17" / "work").mkdir(parents=True)
    (executor.work_root / "keep").mkdir()
    assert executor.purge_stale() == 1
    assert not (executor.work_root / "a17").exists()
    assert (executor.work_root / "keep").exists()


def test_cleanup_read_only_dirs(executor: Executor) -> None:
    ex, res = executor.run(spec("mkdir -p ro/sub && touch ro/sub/f && chmod 500 ro/sub ro"))
    assert res.exit_code == 0
    ex.cleanup()
    assert not ex.sandbox.exists()


# ------------------------------------------------------- speed (DESIGN §10)


def test_delivered_empty_sandbox_is_recycled(executor: Executor) -> None:
    ex1, res1 = executor.run(spec("echo first"))
    assert res1.outcome == "exited" and log_text(ex1)["stdout"] == "first\n"
    assert ex1.work_empty
    ex1.cleanup(background=True)
    assert not ex1.sandbox.exists() and len(executor._spares) == 1
    ex2, res2 = executor.run(spec(["sh", "-c", "echo -n second >&2; pwd"]))
    assert executor._spares == []  # the spare was taken
    assert (res2.outcome, res2.exit_code) == ("exited", 0)
    # the logs of the earlier attempt are gone; the new attempt has its own path
    assert log_text(ex2) == {"stdout": f"{ex2.work_dir}\n", "stderr": "second"}
    assert ex2.sandbox.name == f"a{ex2.attempt_id}"
    ex2.cleanup(background=True)
    executor.drop_spares()
    assert executor.cleaner.flush(5)
    assert list(executor.work_root.iterdir()) == []


def test_sandboxes_with_files_or_changed_modes_are_not_recycled(executor: Executor) -> None:
    for command in ("touch left-behind", "chmod 500 .", "mkdir d"):
        ex, res = executor.run(spec(command))
        assert res.outcome == "exited", command
        ex.cleanup(background=True)
        assert executor._spares == [], command
    ex, res = executor.run(spec("true", outputs=["never"]))
    assert res.error == "never: declared output was not produced"
    assert executor.cleaner.flush(5)
    executor.drop_spares()


def test_purge_stale_removes_spares(executor: Executor) -> None:
    (executor.work_root / ".spare-9" / "work").mkdir(parents=True)
    executor.purge_stale()
    assert list(executor.work_root.iterdir()) == []


def test_clone_file_copies_bytes(tmp_path: Path) -> None:
    from herder.agent.executor import clone_file

    src = tmp_path / "src"
    src.write_bytes(os.urandom(300_000))
    how = clone_file(src, tmp_path / "dst")
    assert how in ("reflink", "copy_file_range", "copy")
    assert (tmp_path / "dst").read_bytes() == src.read_bytes()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    clone_file(empty, tmp_path / "dst2")
    assert (tmp_path / "dst2").read_bytes() == b""


def test_staging_with_another_mode_copies(executor: Executor) -> None:
    data = b"#!/bin/sh\necho run\n"
    r = req(executor.blobs, "tool.sh", data, mode=0o755)
    ex, res = executor.run(spec("./tool.sh", requires=[r]))
    assert (res.outcome, res.exit_code) == ("exited", 0) and log_text(ex)["stdout"] == "run\n"
    staged = ex.work_dir / "tool.sh"
    assert staged.read_bytes() == data and os.stat(staged).st_mode & 0o777 == 0o755
    assert os.stat(staged).st_ino != os.stat(executor.blobs.path(r.digest)).st_ino
    ex.cleanup()
