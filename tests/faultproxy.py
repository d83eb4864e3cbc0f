"""A fault-injecting TCP proxy for the chaos tests (loopback only).

``FaultProxy`` listens on a loopback port and forwards every connection to an
upstream loopback address, byte for byte, from one thread (``selectors``).
It can:

* ``cut("blackhole")``: a network partition. Nothing is forwarded any more in
  either direction; open connections are held (their bytes stay unread in the
  kernel buffers), and new connections are accepted but never connected
  upstream, so the peer sees hangs and timeouts, not errors;
* ``cut("reset")``: every open connection is reset (RST) and every new one is
  reset as soon as it is accepted, so the peer sees errors at once;
* ``heal()``: connections held by a blackhole are reset (a partition that
  outlived them: the peer's requests fail and are retried) and forwarding
  resumes for new connections.

It records every byte it forwarded in each direction (``downstream()``: from
the upstream server to the client; ``upstream()``: from the client), so a
test can check what a client was told, e.g. that an agent's late completion
was refused as stale.
"""

from __future__ import annotations

import contextlib
import ipaddress
import queue
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

CutMode = Literal["blackhole", "reset"]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), never blocking."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


@dataclass
class _Pair:
    client: socket.socket
    server: socket.socket | None
    held: bool = False


@dataclass
class ProxyStats:
    accepted: int = 0
    forwarded_up: int = 0
    forwarded_down: int = 0
    reset: int = 0
    held: int = 0
    cuts: int = 0
    heals: int = 0
    events: list[tuple[float, str]] = field(default_factory=list)


class FaultProxy:
    def __init__(
        self,
        upstream_port: int,
        upstream_host: str = "127.0.0.1",
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        record: bool = True,
    ) -> None:
        if not (_loopback(upstream_host) and _loopback(listen_host)):
            raise ValueError("FaultProxy works on loopback addresses only")
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server((listen_host, listen_port), backlog=256)
        self._listener.setblocking(False)
        self.host, self.port = self._listener.getsockname()[:2]
        self.record = record
        self.stats = ProxyStats()
        self._mode: Literal["open", "blackhole", "reset"] = "open"
        self._pairs: dict[socket.socket, _Pair] = {}  # both ends map to their pair
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, "accept")
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._commands: queue.Queue[tuple[str, CutMode | None, threading.Event]] = queue.Queue()
        self._rec_lock = threading.Lock()
        self._down = bytearray()
        self._up = bytearray()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="faultproxy", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- control

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def mode(self) -> str:
        return self._mode

    def cut(self, mode: CutMode = "blackhole") -> None:
        """Partition the link (see the module doc). Returns once in effect."""
        if mode not in ("blackhole", "reset"):
            raise ValueError(f"unknown cut mode {mode!r}")
        self._command("cut", mode)

    def heal(self) -> None:
        """End the partition: reset held connections, forward new ones."""
        self._command("heal", None)

    def close(self) -> None:
        if self._stop:
            return
        self._command("close", None)
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def downstream(self) -> bytes:
        """Every byte forwarded from the upstream server to clients, in order."""
        with self._rec_lock:
            return bytes(self._down)

    def upstream_bytes(self) -> bytes:
        """Every byte forwarded from clients to the upstream server, in order."""
        with self._rec_lock:
            return bytes(self._up)

    def _command(self, name: str, mode: CutMode | None) -> None:
        done = threading.Event()
        self._commands.put((name, mode, done))
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if not done.wait(10):
            raise RuntimeError(f"fault proxy did not apply {name!r} within 10 s")

    # ------------------------------------------------------------------- loop

    def _note(self, what: str) -> None:
        self.stats.events.append((time.monotonic(), what))

    def _loop(self) -> None:
        try:
            while not self._stop:
                for key, _ in self._sel.select(timeout=0.5):
                    tag = key.data
                    if tag == "accept":
                        self._accept()
                    elif tag == "wake":
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                        self._run_commands()
                    else:
                        self._forward(key.fileobj)  # type: ignore[arg-type]
                self._run_commands()
        finally:
            self._shutdown()

    def _run_commands(self) -> None:
        while True:
            try:
                name, mode, done = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                if name == "cut":
                    assert mode is not None
                    self._do_cut(mode)
                elif name == "heal":
                    self._do_heal()
                elif name == "close":
                    self._stop = True
            finally:
                done.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.stats.accepted += 1
            if self._mode == "reset":
                self.stats.reset += 1
                _reset(client)
                continue
            if self._mode == "blackhole":
                self.stats.held += 1
                pair = _Pair(client, None, held=True)
                self._pairs[client] = pair
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                self.stats.reset += 1
                _reset(client)
                continue
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Blocking sends with a bound: both peers are live local processes.
            client.settimeout(5)
            server.settimeout(5)
            pair = _Pair(client, server)
            self._pairs[client] = pair
            self._pairs[server] = pair
            self._sel.register(client, selectors.EVENT_READ, "data")
            self._sel.register(server, selectors.EVENT_READ, "data")

    def _forward(self, sock: socket.socket) -> None:
        pair = self._pairs.get(sock)
        if pair is None or pair.held:
            return
        other = pair.server if sock is pair.client else pair.client
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return
        except OSError:
            data = b""
        if not data or other is None:
            self._drop(pair, rst=False)
            return
        downstream = sock is pair.server
        if self.record:  # before sending: a reader that got the bytes finds them recorded
            with self._rec_lock:
                (self._down if downstream else self._up).extend(data)
        try:
            other.sendall(data)
        except OSError:
            self._drop(pair, rst=True)
            return
        if downstream:
            self.stats.forwarded_down += len(data)
        else:
            self.stats.forwarded_up += len(data)

    def _unregister(self, pair: _Pair) -> None:
        for s in (pair.client, pair.server):
            if s is None:
                continue
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(s)

    def _drop(self, pair: _Pair, *, rst: bool) -> None:
        self._unregister(pair)
        for s in (pair.client, pair.server):
            if s is None:
                continue
            self._pairs.pop(s, None)
            if rst:
                _reset(s)
            else:
                with contextlib.suppress(OSError):
                    s.close()

    def _all_pairs(self) -> list[_Pair]:
        seen: dict[int, _Pair] = {}
        for p in self._pairs.values():
            seen[id(p)] = p
        return list(seen.values())

    def _do_cut(self, mode: CutMode) -> None:
        self.stats.cuts += 1
        self._note(f"cut {mode}")
        self._mode = mode
        for pair in self._all_pairs():
            if mode == "reset":
                self.stats.reset += 1
                self._drop(pair, rst=True)
            elif not pair.held:
                self._unregister(pair)  # stop reading: bytes stay in the kernel
                pair.held = True
                self.stats.held += 1

    def _do_heal(self) -> None:
        self.stats.heals += 1
        self._note("heal")
        for pair in self._all_pairs():
            if pair.held:
                self.stats.reset += 1
                self._drop(pair, rst=True)
        self._mode = "open"

    def _shutdown(self) -> None:
        for pair in self._all_pairs():
            self._drop(pair, rst=True)
        with contextlib.suppress(OSError):
            self._sel.close()
        for s in (self._listener, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                s.close()
