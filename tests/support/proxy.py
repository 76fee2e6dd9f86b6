"""A TCP proxy on 127.0.0.1 that can lose a server's answers: the request reaches the
server, the server acts on it, and the client only sees the connection close. What a
client meets when a network cut or a crash falls between the server's commit and its
answer."""

from __future__ import annotations

import contextlib
import socket
import threading


class AnswerDropper:
    """Forwards every connection to ``127.0.0.1:target``; while ``drop`` is true, the
    first bytes of the server's answer close both sides instead of reaching the client.
    ``dropped`` counts the answers lost so far."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.drop = True
        self.dropped = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> AnswerDropper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pump, args=(client, upstream, False),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, answers: bool) -> None:
        try:
            while data := src.recv(65536):
                if answers and self.drop:
                    self.dropped += 1
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
