"""
An upstream server for tests: serves a directory on 127.0.0.1 from a
thread (so it answers while a test blocks on a client), counts every
request per path, and can be told to misbehave.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote


class UpstreamFixture:
    def __init__(self, root: str) -> None:
        self.root = root
        self.requests: Counter[str] = Counter()
        self.log: list[tuple[str, str, dict[str, str]]] = []
        #: The bodies of the requests that had one (POSTs), in order.
        self.bodies: list[bytes] = []
        #: path -> (status, body) answered instead of the file.
        self.override: dict[str, tuple[int, bytes]] = {}
        #: path -> body answered to a request that accepts npm's
        #: abbreviated packuments.
        self.abbreviated: dict[str, bytes] = {}
        #: Content-Type of everything it answers.
        self.content_type = "application/octet-stream"
        #: paths whose body stops after half and then stalls.
        self.stall: set[str] = set()
        #: path -> how to misbehave: "half" (close after half the body),
        #: "stall" (half the body, then nothing),
        #: "reset" (half the body, then a TCP reset), "slow" (wait
        #: C{slow_seconds} before answering), "garbage" (not HTTP), or
        #: "500" (an error page).
        self.faults: dict[str, str] = {}
        self.slow_seconds = 3.0
        #: seconds to wait before answering any request.
        self.delay = 0.0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections: list[socket.socket] = []
        fixture = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                # Headers and body are two writes: without this, the body
                # waits for the client's delayed ACK (40 ms a response).
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with fixture._lock:
                    fixture._connections.append(self.connection)

            def do_HEAD(self) -> None:
                fixture._answer(self, head=True)

            def do_GET(self) -> None:
                fixture._answer(self, head=False)

            def do_POST(self) -> None:
                fixture._answer(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def count(self, path: str) -> int:
        with self._lock:
            return self.requests[path]

    def _answer(self, handler: BaseHTTPRequestHandler, head: bool) -> None:
        path = handler.path.split("?", 1)[0]
        with self._lock:
            self.requests[path] += 1
            self.log.append((handler.command, path, dict(handler.headers)))
        length = int(handler.headers.get("Content-Length") or 0)
        if length:
            self.bodies.append(handler.rfile.read(length))
        if self.delay:
            time.sleep(self.delay)
        if path in self.abbreviated and "application/vnd.npm.install-v1+json" in handler.headers.get("Accept", ""):
            self._send(handler, 200, self.abbreviated[path], head)
            return
        if path in self.override:
            status, body = self.override[path]
            self._send(handler, status, body, head)
            return
        fault = self.faults.get(path)
        if fault == "500":
            self._send(handler, 500, b"<html><body>Internal Server Error</body></html>\n", head)
            return
        if fault == "garbage":
            handler.wfile.write(b"SMTP ready\r\n\r\n")
            handler.close_connection = True
            return
        if fault == "slow":
            self._stopping.wait(self.slow_seconds)
        file = os.path.join(self.root, *unquote(path).lstrip("/").split("/"))
        if not os.path.realpath(file).startswith(os.path.realpath(self.root)) or not os.path.isfile(file):
            self._send(handler, 404, b"not found\n", head)
            return
        with open(file, "rb") as f:
            body = f.read()
        if path in self.stall or fault in ("half", "reset", "stall"):
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body[: len(body) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            if fault == "reset":
                # SO_LINGER with a zero timeout: close() sends a RST.
                handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                handler.connection.close()
            elif fault == "half":
                handler.connection.shutdown(socket.SHUT_WR)
            else:
                self._stopping.wait(60)
            return
        self._send(handler, 200, body, head)

    def _send(self, handler: BaseHTTPRequestHandler, status: int, body: bytes, head: bool) -> None:
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(body)))
        content_type = "application/json" if body[:1] == b"{" else self.content_type
        handler.send_header("Content-Type", content_type)
        handler.end_headers()
        if not head:
            handler.wfile.write(body)

    def stop(self) -> None:
        """
        Stop listening and cut every open connection (kept-alive ones too),
        as a server that goes down does.
        """
        self._stopping.set()
        self.server.shutdown()
        self.server.server_close()
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
