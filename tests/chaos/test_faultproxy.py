"""The fault proxy forwards, blackholes, resets and heals as documented."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from faultproxy import FaultProxy


@pytest.fixture
def echo_port() -> Iterator[int]:
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(4096)
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(b"echo:" + data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join(2)
    srv.close()


def roundtrip(port: int, data: bytes, timeout: float = 2.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return s.recv(4096)


def test_forward_cut_heal(echo_port: int) -> None:
    with FaultProxy(echo_port) as proxy:
        assert roundtrip(proxy.port, b"hello") == b"echo:hello"

        # A connection open before the cut is held: it sends into the void.
        held = socket.create_connection(("127.0.0.1", proxy.port), timeout=0.5)
        held.sendall(b"one")
        assert held.recv(100) == b"echo:one"
        proxy.cut("blackhole")
        held.sendall(b"two")
        with pytest.raises(TimeoutError):
            held.recv(100)
        # New connections are accepted but never answered.
        with pytest.raises(TimeoutError):
            roundtrip(proxy.port, b"lost", timeout=0.5)

        # Heal: held connections die, new ones work again.
        proxy.heal()
        held.settimeout(2)
        with pytest.raises((ConnectionResetError, ConnectionAbortedError)):
            if held.recv(100) == b"":  # an orderly close would also end it
                raise ConnectionResetError
        held.close()
        assert roundtrip(proxy.port, b"again") == b"echo:again"

        # Reset mode: errors at once, not hangs.
        proxy.cut("reset")
        t0 = time.monotonic()
        with pytest.raises((ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
            if roundtrip(proxy.port, b"x", timeout=3) == b"":
                raise ConnectionResetError
        assert time.monotonic() - t0 < 2
        proxy.heal()
        assert roundtrip(proxy.port, b"back") == b"echo:back"

        down = proxy.downstream()
        assert b"echo:hello" in down and b"echo:back" in down
        assert b"echo:two" not in down and b"echo:lost" not in down
        assert proxy.stats.cuts == 2 and proxy.stats.heals == 2


def test_loopback_only() -> None:
    with pytest.raises(ValueError):
        FaultProxy(80, "192.0.2.1")
    with contextlib.suppress(OSError), pytest.raises(ValueError):
        FaultProxy(80, listen_host="0.0.0.0")
