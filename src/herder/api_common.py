"""What every part of the wire contract shares (herder.api_models re-exports it).

State and option names, digests, inline blobs and their limits, the checks of
job-relative paths and of tags, and the two file records both directions
carry: a required file (client → agent) and an output file (agent → client).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Literal

from pydantic import Field, field_validator

from herder.api_base import _In
from herder.api_limits import (
    Int64,
)
from herder.names import name_problem
from herder.paths import UnsafePath, normalize_relpath

DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="sha256, lowercase hex")]
TaskStateName = Literal[
    "blocked", "queued", "offered", "running", "succeeded", "failed", "cancelled", "rejected"
]
JobStateName = Literal["waiting", "queued", "running", "paused", "succeeded", "failed", "cancelled"]
#: What a job with parents (``depends_on``) does when one of them fails or is
#: cancelled: fail too, or stay held until that parent is retried and succeeds.
OnParentFailure = Literal["fail", "hold"]
#: The order a stage's tasks are dispatched in: as listed, or the first, the
#: last, then middle-out by binary subdivision (early previews of a render).
FrameOrder = Literal["sequential", "first-last-middle"]
#: The most parents one job may name.
DEPENDS_ON_MAX = 1000
#: How an agent gets work: from a master, or from the database itself (DESIGN §6).
AgentMode = Literal["master", "autonomous"]

#: Small files travel inside the claim round trip instead of a blob request
#: each (DESIGN §10): required files up to INLINE_REQUIRE_MAX in an offer,
#: outputs up to INLINE_OUTPUT_MAX in a completion, INLINE_TOTAL_MAX in all.
INLINE_REQUIRE_MAX = 64 * 1024
INLINE_OUTPUT_MAX = 256 * 1024
INLINE_TOTAL_MAX = 1024 * 1024
#: A submission may carry its small input files inline (each up to
#: INLINE_REQUIRE_MAX, SUBMIT_INLINE_MAX in all) instead of a PUT each.
SUBMIT_INLINE_MAX = 16 * 1024 * 1024
#: A followed job's results carry logs up to FOLLOW_LOG_MAX characters per
#: stream and outputs up to INLINE_OUTPUT_MAX each, FOLLOW_INLINE_MAX per page.
FOLLOW_LOG_MAX = 64 * 1024
FOLLOW_INLINE_MAX = 4 * 1024 * 1024


def decode_inline(blobs: dict[str, str]) -> dict[str, bytes]:
    """``{sha256: base64}`` → ``{sha256: bytes}``; ValueError names a bad entry."""
    out: dict[str, bytes] = {}
    for digest, text in blobs.items():
        try:
            out[digest] = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"inline blob {digest}: not valid base64") from None
    return out


def encode_inline(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


#: The most output files one completion may list.
OUTPUTS_MAX = 100_000


def _check_relpath(value: str) -> str:
    try:
        norm = normalize_relpath(value)
    except UnsafePath as exc:
        raise ValueError(str(exc)) from None
    problem = name_problem(norm)
    if problem is not None:
        raise ValueError(f"path {problem}")
    return norm


def _check_output_name(value: str) -> str:
    # A backslash is a fine POSIX name but no output of that name can be
    # brought back portably: refused at submission instead of on an agent.
    if "\\" in value:
        raise ValueError(f"path contains a backslash: {value!r}")
    return _check_relpath(value)


# --------------------------------------------------------------------- submit


TAGS_MAX = 100
GPUS_MAX = 1024
_TAG_RE = re.compile(r"^[A-Za-z0-9_.:+=/-]{1,100}$")


def _check_tags(tags: list[str], *, negation: bool) -> list[str]:
    """Tags are names (letters, digits, ``_.:+=/-``); on tasks ``!tag`` negates one."""
    for tag in tags:
        name = tag[1:] if negation and tag.startswith("!") else tag
        if not _TAG_RE.match(name):
            how = "; a leading ! negates it" if negation else ""
            raise ValueError(
                f"{tag!r} is not a valid tag (1-100 letters, digits or _.:+=/- characters{how})"
            )
    if negation:
        both = {t for t in tags if not t.startswith("!")} & {
            t[1:] for t in tags if t.startswith("!")
        }
        if both:
            raise ValueError(f"tags both required and negated: {', '.join(sorted(both))}")
    return tags


def task_tags_problem(tags: list[str]) -> str | None:
    """What is wrong with a task's tags (``!tag`` negates), or None."""
    try:
        _check_tags(tags, negation=True)
    except ValueError as exc:
        return str(exc)
    return None


def agent_tags_problem(tags: list[str]) -> str | None:
    """What is wrong with an agent's tags, or None."""
    try:
        _check_tags(tags, negation=False)
    except ValueError as exc:
        return str(exc)
    return None


class RequiredFile(_In):
    path: str = Field(
        description="relative to the job root; staged at the same path in the sandbox"
    )
    digest: Digest
    mode: int | None = Field(default=None, ge=0, le=0o7777, description="file mode bits")

    _norm = field_validator("path")(_check_relpath)


class OutputFile(_In):
    path: str
    digest: Digest
    size: Int64 = Field(ge=0)
    mode: int = Field(default=0o644, ge=0, le=0o7777)

    _norm = field_validator("path")(_check_relpath)
