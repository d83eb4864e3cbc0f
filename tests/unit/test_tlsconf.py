"""herder.tlsconf over real loopback TLS: the agent's threaded listeners (JsonServer) with a
certificate, and the client's request loop verifying it (seeds/004: a certificate that does
not verify is a dead server, never a busy one, and a client riding outages fails fast)."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from herder.agent.jsonhttp import JsonHandler, JsonServer
from herder.certs import init_certs
from herder.client import HerderClient
from herder.tlsconf import (
    TlsConfigError,
    TlsVerifyError,
    TlsWarnings,
    check_pair,
    client_context,
    client_verify,
    server_context,
    set_default_ca,
    verify_error,
    verify_failure_line,
)


class _Health(JsonHandler):
    log = logging.getLogger("test.tls")

    def _handle(self, method: str) -> None:
        self._send(200, {"status": "ok", "path": self.path})


@pytest.fixture(scope="module")
def farm_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tls")
    init_certs(root / "farm")
    init_certs(root / "other")
    return root / "farm", root / "other"


def _serve(ctx: ssl.SSLContext | None) -> tuple[JsonServer, str]:
    server = JsonServer(("127.0.0.1", 0), _Health)
    server.ssl_context = ctx
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
    ).start()
    scheme = "https" if ctx is not None else "http"
    return server, f"{scheme}://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def tls_server(farm_dirs: tuple[Path, Path]) -> Iterator[str]:
    farm, _ = farm_dirs
    server, url = _serve(server_context(farm / "server.crt", farm / "server.key"))
    yield url
    server.shutdown()
    server.server_close()


@pytest.fixture
def plain_server() -> Iterator[str]:
    server, url = _serve(None)
    yield url
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def _no_default_ca(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("HERDER_CA", raising=False)
    yield
    set_default_ca(None)


# ---------------------------------------------------------------- loading


def test_cert_and_key_go_together() -> None:
    assert check_pair(None, None) is False
    assert check_pair("c.pem", "k.pem") is True
    with pytest.raises(TlsConfigError, match="--tls-key is missing"):
        check_pair("c.pem", None)
    with pytest.raises(TlsConfigError, match="--tls-cert is missing"):
        check_pair(None, "k.pem")


def test_unusable_files_are_one_line_errors(farm_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    farm, other = farm_dirs
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cases: list[tuple[Any, str]] = [
        (lambda: server_context(tmp_path / "nope.crt", farm / "server.key"), "no such file"),
        (lambda: server_context(farm / "server.crt", other / "server.key"), "cannot use"),
        (lambda: server_context(junk, farm / "server.key"), "cannot use certificate"),
        (lambda: client_context(tmp_path / "nope.crt"), "CA bundle .*no such file"),
        (lambda: client_context(junk), "cannot load CA bundle"),
    ]
    for make, message in cases:
        with pytest.raises(TlsConfigError, match=message) as info:
            make()
        assert "\n" not in str(info.value) and str(info.value).startswith("TLS: ")


def test_verify_resolves_ca_option_then_env_then_system(
    farm_dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    farm, other = farm_dirs

    def subjects(ctx: ssl.SSLContext | bool) -> list[Any]:  # the CAs it trusts
        assert isinstance(ctx, ssl.SSLContext)
        return [c["serialNumber"] for c in ctx.get_ca_certs()]

    ours = subjects(client_context(farm / "ca.crt"))
    assert client_verify(False) is False
    assert subjects(client_verify(str(farm / "ca.crt"))) == ours
    system = client_verify(True)
    assert system is client_context(None)  # one shared system context
    monkeypatch.setenv("HERDER_CA", str(other / "ca.crt"))
    env = subjects(client_verify(True))
    assert len(env) == 1 and env != ours
    set_default_ca(farm / "ca.crt")  # the CLI's --ca wins over the environment
    assert subjects(client_verify(True)) == ours


# ------------------------------------------------------------- listeners


def test_threaded_listener_serves_https_verified_by_the_farm_ca(
    tls_server: str, farm_dirs: tuple[Path, Path]
) -> None:
    farm, _ = farm_dirs
    with httpx.Client(verify=client_context(farm / "ca.crt")) as http:
        r = http.get(f"{tls_server}/x")
    assert r.json() == {"status": "ok", "path": "/x"}


def test_plain_http_to_a_tls_listener_is_told_to_use_https(tls_server: str) -> None:
    r = httpx.get(tls_server.replace("https://", "http://") + "/x", timeout=5)
    assert r.status_code == 400
    assert r.json() == {
        "error": "tls_required",
        "message": "this listener speaks TLS: use https://",
    }


def test_a_silent_client_does_not_stall_the_listener(
    tls_server: str, farm_dirs: tuple[Path, Path]
) -> None:
    farm, _ = farm_dirs
    port = int(tls_server.rsplit(":", 1)[1])
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        t0 = time.monotonic()
        with httpx.Client(verify=client_context(farm / "ca.crt"), timeout=5) as http:
            assert http.get(f"{tls_server}/y").status_code == 200
        assert time.monotonic() - t0 < 4.5  # a stalled listener waits out 10 s handshakes
    finally:
        for s in silent:
            s.close()


# ------------------------------------------------------------ the client


def test_client_verifies_the_master_against_its_ca(
    tls_server: str, farm_dirs: tuple[Path, Path]
) -> None:
    farm, other = farm_dirs
    with HerderClient(tls_server, verify=str(farm / "ca.crt")) as client:
        assert client.health()["status"] == "ok"
    with (
        HerderClient(tls_server, verify=str(other / "ca.crt")) as client,
        pytest.raises(TlsVerifyError) as info,
    ):
        client.health()
    line = str(info.value)
    assert line.startswith(f"TLS: certificate verify failed for {tls_server}: ")
    assert "\n" not in line and "certificate" in line.split(": ", 2)[2]
    assert [a.outcome for a in info.value.attempts] == ["tls"]


def test_client_default_is_herder_ca_else_the_system_store(
    tls_server: str, farm_dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    farm, _ = farm_dirs
    # the system store does not know the farm CA
    with HerderClient(tls_server) as client, pytest.raises(TlsVerifyError):
        client.health()
    monkeypatch.setenv("HERDER_CA", str(farm / "ca.crt"))
    with HerderClient(tls_server) as client:
        assert client.health()["status"] == "ok"


def test_a_master_that_fails_verification_is_dead_and_the_next_one_is_tried(
    tls_server: str, plain_server: str, farm_dirs: tuple[Path, Path]
) -> None:
    _, other = farm_dirs
    with HerderClient([tls_server, plain_server], verify=str(other / "ca.crt")) as client:
        assert client.health()["status"] == "ok"  # mixed https:// and http:// masters
        assert client.preferred == plain_server
        assert [(f.url, f.kind) for f in client.failures] == [(tls_server, "tls")]


def test_a_client_riding_outages_does_not_wait_for_a_certificate(
    tls_server: str, farm_dirs: tuple[Path, Path]
) -> None:
    _, other = farm_dirs
    t0 = time.monotonic()
    with (
        HerderClient(tls_server, verify=str(other / "ca.crt"), master_timeout=120) as client,
        pytest.raises(TlsVerifyError),
    ):
        client.health()
    assert time.monotonic() - t0 < 5.0


def test_verify_error_is_found_under_httpx_wrapping(
    tls_server: str, farm_dirs: tuple[Path, Path]
) -> None:
    _, other = farm_dirs
    with (
        httpx.Client(verify=client_context(other / "ca.crt")) as http,
        pytest.raises(httpx.ConnectError) as info,
    ):
        http.get(tls_server)
    err = verify_error(info.value)
    assert err is not None
    assert verify_failure_line(f"{tls_server}/api/v1/jobs", err) == (
        f"TLS: certificate verify failed for {tls_server}: {err.verify_message}"
    )
    assert verify_error(httpx.ConnectError("refused")) is None


def test_talkback_tls_failures_warn_once_per_endpoint(
    tls_server: str, farm_dirs: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    _, other = farm_dirs
    caplog.set_level(logging.DEBUG, logger="test.tls.warn")
    warnings = TlsWarnings(logging.getLogger("test.tls.warn"), "talkback_cancel_tls_failed")
    with httpx.Client(verify=client_context(other / "ca.crt")) as http:
        for _ in range(3):
            with pytest.raises(httpx.ConnectError) as info:
                http.post(f"{tls_server}/talkback/cancel")
            assert warnings.warn(f"{tls_server}/talkback/cancel", info.value, agent="a1")
    assert not warnings.warn(tls_server, httpx.ConnectError("connection refused"))
    levels = [r.levelno for r in caplog.records if r.name == "test.tls.warn"]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    first = next(r for r in caplog.records if r.name == "test.tls.warn").getMessage()
    assert first.startswith(f"event=talkback_cancel_tls_failed url={tls_server} agent=a1 error=")
    assert f"TLS: certificate verify failed for {tls_server}: " in first
