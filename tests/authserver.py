"""An auth server answering nsqd's auth protocol, for brokers started with ``--auth-http-address``.

nsqd (and the embedded broker) ask ``GET /auth?common_name=&remote_ip=&secret=&tls=``
when a client sends AUTH, and again once the answer's ``ttl`` has passed. The
server answers each secret it was given with that secret's grant, and any
other with 403 (which brokers turn into ``E_AUTH_FAILED``); it keeps every
query it was asked, for tests to check what the broker sent.
"""

from __future__ import annotations

import http.server
import json
import threading
import urllib.parse
from types import TracebackType
from typing import Any


def grant(identity: str, *authorizations: dict[str, Any], ttl: int = 3600, identity_url: str = "") -> dict[str, Any]:
    """An auth server's answer: ``identity`` may do what ``authorizations`` allow for ``ttl`` seconds."""
    return {"ttl": ttl, "identity": identity, "identity_url": identity_url, "authorizations": list(authorizations)}


def allow(
    topic: str, channels: tuple[str, ...] = (".*",), permissions: tuple[str, ...] = ("subscribe", "publish")
) -> dict[str, Any]:
    """One authorization: regular expressions of topics and channels, and what is permitted on them."""
    return {"topic": topic, "channels": list(channels), "permissions": list(permissions)}


class AuthServer:
    """The auth server on a free loopback port, in a thread: ``with AuthServer({secret: grant(...)}) as server``."""

    def __init__(self, grants: dict[str, dict[str, Any]]) -> None:
        self.grants = grants
        self.queries: list[dict[str, str]] = []  # each query's parameters, in order
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
                owner.queries.append(query)
                answer = owner.grants.get(query.get("secret", "")) if url.path == "/auth" else None
                if answer is None:
                    self.send_response(403)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> AuthServer:
        threading.Thread(target=self._server.serve_forever, name="auth-server", daemon=True).start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
