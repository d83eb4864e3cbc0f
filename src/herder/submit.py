"""Turn a job file (JSON JobSubmit or TOML) into a submission plus its uploads.

Everything is checked here, before the CLI talks to a farm: a bad job file
or a required file that cannot be sent is a :class:`JobFileError` at
``file:line:col`` and nothing is uploaded or submitted.

:meth:`PreparedJob.submit` sends it in two transactions (issue 10): the
master creates the job, waiting for the required files it lacks, and answers
a continuation naming them; the client uploads those (and only those), the
last one releases the job. A crash in between leaves the job waiting; running
``herder submit`` again with the same ``idempotency_key`` resumes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from herder.api_models import JobSubmit
from herder.inputs import (
    BadEncoding,
    SourceProblem,
    decode_utf8,
    read_source,
    required_file_problem,
)
from herder.jobfile import JobFile, JobFileError, load_jobfile, to_job_submit
from herder.jsonjob import parse_json_job

if TYPE_CHECKING:
    from herder.api_models import JobView
    from herder.client import HerderClient
    from herder.client.files import InputSource

__all__ = ["JobFileError", "PreparedJob", "prepare_jobfile"]


@dataclass
class PreparedJob:
    job: JobSubmit
    root: Path
    paths: list[str]
    # {digest: file} when already hashed (a TOML job file); else hashed by inputs().
    hashed: dict[str, Path] | None = field(default=None, repr=False)

    def upload(self, client: HerderClient) -> None:
        """Upload the required files the store lacks (only those), before a submission."""
        if self.paths:
            client.upload_files(self.root, self.paths)

    def inputs(self) -> dict[str, InputSource]:
        """``{digest: file}`` of the job's required files that are under its root."""
        if self.hashed is not None:
            return dict(self.hashed)
        from herder.client.files import hash_files

        _, where = hash_files(self.root, self.paths)
        return dict(where)

    def submit(self, client: HerderClient, job: JobSubmit | None = None) -> JobView:
        """Submit ``job`` (default: this one) with ``inputs=later``: the master holds it
        until the required files it lacks are uploaded, which this does (the
        continuation names them). Its view once the uploads are in."""
        return client.submit_job(job or self.job, inputs=self.inputs())


def prepare_jobfile(path: Path) -> PreparedJob:
    """Read a job file; required files are relative to the file's directory.

    Raises :class:`JobFileError` (``file:line:col: message``) for any problem:
    the file itself, its content, or a required file.
    """
    root = path.resolve().parent
    if path.suffix == ".toml":
        return _prepare_toml(load_jobfile(path), path, root)
    try:
        text = decode_utf8(read_source(path))
    except BadEncoding as exc:
        raise JobFileError(str(path), str(exc), exc.line, exc.col) from None
    except SourceProblem as exc:
        raise JobFileError(str(path), f"cannot read the job file: it {exc}", 1, 1) from None
    job, paths = parse_json_job(text, str(path), root)
    return PreparedJob(job, root, paths)


def _prepare_toml(jf: JobFile, path: Path, root: Path) -> PreparedJob:
    from herder.client import sha256_file

    first_use: dict[str, tuple[str | int, ...]] = {}
    for s in jf.stages:
        for t in s.tasks:
            for p in t.requires:
                first_use.setdefault(p, t.source)
    digests: dict[str, str] = {}
    modes: dict[str, int] = {}
    for rel, source in first_use.items():
        problem = required_file_problem(root, rel)
        if problem is None:
            target = root / rel
            try:
                digests[rel] = sha256_file(target)
                modes[rel] = target.stat().st_mode & 0o7777
            except OSError as exc:  # changed since it was checked
                problem = f"required file {rel!r} cannot be read: {exc.strerror or exc}"
        if problem is not None:
            raise jf.error_at((*source, "requires"), problem)
    try:
        job = to_job_submit(jf, digests, modes)
    except ValidationError as exc:  # a rule of the whole job the loader does not repeat
        first = exc.errors()[0]
        raise JobFileError(str(path), str(first.get("msg", exc)), 1, 1) from None
    hashed = {digests[rel]: root / rel for rel in first_use}
    return PreparedJob(job, root, list(first_use), hashed)
