"""schemathesis against a real master on loopback (issue 11): whatever the document
allows, the master never answers a 5xx, and every status it answers is documented.

The long-polls (follow, claim) are left out: a generated ``wait_s`` would make
each example wait up to a minute; their inputs are covered by test_api_inputs.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.schemas import APIOperation

from herder.localfarm import LocalFarm


@pytest.fixture(scope="module")
def fuzz_master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFarm]:
    farm = LocalFarm(workdir=tmp_path_factory.mktemp("fuzz"))
    farm.start_master()
    try:
        yield farm
    finally:
        farm.close()


def operations(url: str) -> list[APIOperation]:
    doc = httpx.get(f"{url}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(doc).exclude(path_regex=r"/follow$|/claim$")
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.timeout(180)
def test_no_server_errors_and_only_documented_statuses(fuzz_master: LocalFarm) -> None:
    failures: list[str] = []
    ops = operations(fuzz_master.url)
    assert len(ops) > 20  # the whole API, not an empty document

    for op in ops:

        @settings(
            max_examples=8,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(case=op.as_strategy())
        def run(case: schemathesis.Case) -> None:
            response = case.call(base_url=fuzz_master.url, timeout=30)
            where = f"{case.method} {case.formatted_path}"
            if response.status_code >= 500:
                failures.append(f"{where}: {response.status_code} {response.text[:300]}")
            documented = case.operation.definition.raw.get("responses", {})
            if str(response.status_code) not in documented:
                failures.append(f"{where}: undocumented {response.status_code}")

        run()
    assert not failures, "\n".join(sorted(set(failures)))
    assert fuzz_master.master is not None
    assert "Traceback" not in fuzz_master.master.log_text()
