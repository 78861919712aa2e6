"""A TCP relay on loopback between a client under test and a real Redis, which can pause
one connection: the one whose client sends a given marker. What that connection sent
from the marker on waits in the relay (as on a network path that stalls) until
:meth:`HoldingRelay.release`; every other connection goes on meanwhile."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

__all__ = ["HoldingRelay"]


class HoldingRelay:
    """Relays ``127.0.0.1:<port>`` to a Redis on ``127.0.0.1:<to_port>``, both ways, a
    thread per direction and connection."""

    def __init__(self, to_port: int) -> None:
        self.to_port = to_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._marker: bytes | None = None
        #: set once a connection sent the marker and is held
        self.held = threading.Event()
        self._go = threading.Event()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._accepting = threading.Thread(target=self._accept, name="relay-accept",
                                           daemon=True)
        self._accepting.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def hold(self, marker: bytes) -> None:
        """From now on, the connection whose client sends ``marker`` is held there."""
        self._go.clear()
        self.held.clear()
        self._marker = marker

    def release(self) -> None:
        """What the held connection sent goes on; nothing is held any more."""
        self._marker = None
        self._go.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.to_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        tail = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                marker = self._marker
                if from_client and marker is not None and marker in tail + data:
                    self.held.set()
                    self._go.wait()
                if marker is not None:
                    tail = (tail + data)[-len(marker):]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        self.release()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self._listener.close()
        with self._lock:
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.close()

    def __enter__(self) -> HoldingRelay:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
