"""herder.client over real TCP: keep-alive (one connection), TCP_NODELAY, failover."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from herder.client import HerderClient, NoMasterAvailable, RequestOutcomeUnknown


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    connections = 0
    priorities: list[bool]
    busy_until_priority = False
    close_after_each = False
    idle_timeout: float | None = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server: _Server

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout  # closes idle keep-alive connections
        super().setup()
        # http.server writes headers and body separately: without this, Nagle +
        # delayed ACK would add ~40 ms per answer (a server-side artefact).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections += 1

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        if self.server.close_after_each:
            # Drop the connection without saying so, like a keep-alive timeout.
            self.close_connection = True

    def do_GET(self) -> None:
        priority = self.headers.get("Herder-Priority") == "1"
        self.server.priorities.append(priority)
        if self.server.busy_until_priority and not priority:
            self._send(503, {"error": "busy", "message": "busy", "queued": 1}, {"Retry-After": "1"})
            return
        if self.path == "/api/v1/health":
            self._send(200, {"status": "ok"})
        else:
            self._send(404, {"error": "not_found", "message": self.path})

    def do_PUT(self) -> None:
        length = int(self.headers["Content-Length"])
        data = self.rfile.read(length)
        digest = self.path.rsplit("/", 1)[-1]
        self._send(201, {"digest": digest, "size": len(data), "href": self.path, "created": True})


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.priorities = []
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def _url(srv: _Server) -> str:
    host, port = srv.server_address[:2]
    return f"http://{host!s}:{port}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_one_kept_alive_connection_across_calls(server: _Server) -> None:
    with HerderClient(_url(server)) as client:
        for _ in range(20):
            assert client.health() == {"status": "ok"}
        stored = client.put_blob("ab" * 32, b"x" * 100_000)
        assert stored.size == 100_000
        assert client.health() == {"status": "ok"}
    assert server.connections == 1


def test_tcp_nodelay_is_set(server: _Server) -> None:
    with HerderClient(_url(server)) as client:
        response = client._request("GET", "/health", idempotent=True)
        sock = response.extensions["network_stream"].get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_real_connection_refused_fails_over(server: _Server) -> None:
    dead = f"http://127.0.0.1:{_free_port()}"
    with HerderClient([dead, _url(server)], timeout=5) as client:
        assert client.health() == {"status": "ok"}
        assert [f.url for f in client.failures] == [dead]
        assert client.preferred == _url(server)


def test_real_busy_server_answers_priority_request(server: _Server) -> None:
    server.busy_until_priority = True
    with HerderClient(_url(server)) as client:
        assert client.health() == {"status": "ok"}
    assert server.priorities == [False, True]


def test_nothing_listening_raises() -> None:
    with (
        HerderClient(f"127.0.0.1:{_free_port()}", timeout=5) as client,
        pytest.raises(NoMasterAvailable),
    ):
        client.health()


def test_server_closing_idle_connections_is_harmless(server: _Server) -> None:
    # A keep-alive timeout on the server: the client sees the close before reusing
    # the connection, so even a non-idempotent request goes out on a fresh one.
    server.idle_timeout = 0.1
    with HerderClient(_url(server)) as client:
        for _ in range(3):
            client._request("GET", "/health", idempotent=False)
            time.sleep(1.0)  # well past the server's 0.1 s, even on a loaded machine
    assert server.connections == 3


def test_close_racing_the_next_request(server: _Server) -> None:
    # The server drops the connection right after answering, so the next request
    # races the close: an idempotent request is sent again on a fresh connection,
    # a non-idempotent one is reported as ambiguous rather than resent.
    server.close_after_each = True
    with HerderClient(_url(server)) as client:
        for _ in range(5):
            assert client.health() == {"status": "ok"}
        assert client.failures == []
        seen_before = len(server.priorities)
        answered = 0
        for _ in range(5):
            try:
                client._request("GET", "/health", idempotent=False)
                answered += 1
            except RequestOutcomeUnknown:
                pass
        # Never sent twice: the server saw exactly the requests that were answered.
        assert len(server.priorities) - seen_before == answered


def test_client_is_shared_by_threads(server: _Server) -> None:
    errors: list[BaseException] = []
    with HerderClient(_url(server)) as client:

        def work() -> None:
            try:
                for _ in range(25):
                    assert client.health() == {"status": "ok"}
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert errors == []
    assert len(server.priorities) == 200
    assert server.connections <= 8
