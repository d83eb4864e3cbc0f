"""Reporting masters that failed to the master that answered (DESIGN §6; seeds/000).

``POST /api/v1/masters/{id}/failures`` for each failure the client's request
loop recorded, so the directory hides a master until it heartbeats again.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from herder.client.errors import HerderClientError, NoMasterAvailable, NotFoundError
from herder.client.loop import MasterFailure

if TYPE_CHECKING:
    from herder.client.core import HerderClient
    from herder.client.discovery import MasterDiscovery


def default_reporter() -> str:
    return f"client@{socket.gethostname()}"


def failure_payloads(
    failures: Iterable[MasterFailure],
    *,
    reporter: str | None = None,
    master_ids: Callable[[str], str | None] | None = None,
    exclude: Iterable[str] = (),
) -> list[tuple[str, dict[str, Any]]]:
    """``(path, body)`` of each ``POST /api/v1/masters/{id}/failures``.

    ``{id}`` is the master's directory id when ``master_ids`` knows it, else
    the ``host:port`` of its URL (no ``/``, so it stays one path segment;
    the endpoint should accept either form). Failures of masters in ``exclude`` (the one
    that answered: it is evidently alive) are left out.
    """
    who = reporter or default_reporter()
    skip = set(exclude)
    out: list[tuple[str, dict[str, Any]]] = []
    for f in failures:
        if f.url in skip:
            continue
        ident = (master_ids(f.url) if master_ids is not None else None) or _netloc(f.url)
        body: dict[str, Any] = {
            "time": datetime.fromtimestamp(f.when, UTC).isoformat().replace("+00:00", "Z"),
            "reporter": who,
            "request": f.request,
            "kind": f.kind,
            "url": f.url,
        }
        out.append((f"/masters/{quote(ident, safe=':')}/failures", body))
    return out


def _netloc(url: str) -> str:
    parsed = httpx.URL(url)
    host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return f"{host}:{port}"


@dataclass(frozen=True)
class FailureReport:
    sent: int
    skipped: int  # about the master that answered, or after the endpoint proved missing
    unsupported: bool  # the master has no failures endpoint (404)
    error: str | None = None


def report_failures(
    client: HerderClient,
    failures: Iterable[MasterFailure] | None = None,
    *,
    reporter: str | None = None,
    discovery: MasterDiscovery | None = None,
) -> FailureReport:
    """POST ``failures`` (default: ``client.pop_failures()``) to the master that answered.

    The client's request loop sends them (to its preferred master first). A
    404 means the master has no failures endpoint yet: the rest are dropped.
    Never raises for a master's answer; transport trouble ends the report
    with ``error`` set.
    """
    items = list(client.pop_failures() if failures is None else failures)
    answered = client.preferred
    ids = discovery.master_id if discovery is not None else None
    payloads = failure_payloads(
        items, reporter=reporter, master_ids=ids, exclude=[answered] if answered else []
    )
    skipped = len(items) - len(payloads)
    sent = 0
    for i, (path, body) in enumerate(payloads):
        try:
            client._request("POST", path, json=body, idempotent=True).close()
        except NotFoundError as exc:
            if exc.code == "http_404" or exc.message == "Not Found":
                # The framework's "no such route": this master has no failures endpoint.
                return FailureReport(sent, skipped + len(payloads) - i, True)
            skipped += 1  # the master does not know that master: nothing to record
            continue
        except (NoMasterAvailable, HerderClientError) as exc:
            return FailureReport(sent, skipped + len(payloads) - i, False, str(exc))
        sent += 1
    return FailureReport(sent, skipped, False)
