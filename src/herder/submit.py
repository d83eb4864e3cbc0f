"""Turn a job file (JSON JobSubmit or TOML) into a submission plus its uploads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from herder.api_models import JobSubmit
from herder.jobfile import JobFileError, load_jobfile, to_job_submit
from herder.paths import resolve_inside

if TYPE_CHECKING:
    from herder.client import HerderClient


@dataclass
class PreparedJob:
    job: JobSubmit
    root: Path
    paths: list[str]

    def upload(self, client: HerderClient) -> None:
        """Upload the required files the store lacks (only those)."""
        if self.paths:
            client.upload_files(self.root, self.paths)


def prepare_jobfile(path: Path) -> PreparedJob:
    """Read a job file; required files are relative to the file's directory.

    Raises ValueError (with file and position) for bad content, OSError when
    the file or a required file cannot be read.
    """
    root = path.resolve().parent
    if path.suffix == ".toml":
        try:
            jf = load_jobfile(path)
        except JobFileError as exc:
            raise ValueError(str(exc)) from None
        paths = list(jf.required_paths())
        digests: dict[str, str] = {}
        modes: dict[str, int] = {}
        from herder.client import sha256_file

        for rel in paths:
            target = resolve_inside(root, rel)
            if not target.is_file():
                raise ValueError(f"{path}: required file {rel!r} does not exist in {root}")
            digests[rel] = sha256_file(target)
            modes[rel] = target.stat().st_mode & 0o7777
        return PreparedJob(to_job_submit(jf, digests, modes), root, paths)
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    job = JobSubmit.model_validate(data)
    # Upload the files a JSON job names when they exist next to it; otherwise
    # the store must already hold their blobs.
    paths = sorted(
        {
            r.path
            for s in job.stages
            for t in s.tasks
            for r in t.requires
            if (root / r.path).is_file()
        }
    )
    return PreparedJob(job, root, paths)
