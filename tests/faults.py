"""Fault injection for tests: a TCP hop to a real server that a test can cut.

Services under test connect through the proxy instead of straight to PostgreSQL or
RabbitMQ. `cut(stay_down=True)` drops every open connection and refuses new ones, as
the server being stopped would; `open()` brings it back, as a restart would.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlsplit, urlunsplit


class Proxy:
    """A thread-backed TCP proxy for synchronous tests and subprocess services."""

    def __init__(self, url: str, default_port: int) -> None:
        parts = urlsplit(url)
        self.target = (parts.hostname or "127.0.0.1", parts.port or default_port)
        self._listener: socket.socket | None = None
        self._links: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.port = _free_port()
        credentials = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        self.url = urlunsplit(parts._replace(netloc=f"{credentials}127.0.0.1:{self.port}"))

    @property
    def up(self) -> bool:
        return self._listener is not None

    def open(self) -> Proxy:
        listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def cut(self, *, stay_down: bool = False) -> None:
        if stay_down and self._listener is not None:
            listener, self._listener = self._listener, None
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            links, self._links = list(self._links), set()
        for link in links:
            _abort(link)

    def close(self) -> None:
        self.cut(stay_down=True)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _abort(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._links |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                _abort(end)
            with self._lock:
                self._links -= {source, sink}


def _abort(sock: socket.socket) -> None:
    """Close at once; `shutdown` also wakes the thread blocked reading it."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
