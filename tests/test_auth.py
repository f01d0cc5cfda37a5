"""Sessions and services on an nsqd that requires AUTH, through the public API.

nsqd asks an auth server over HTTP (``--auth-http-address``); the test runs
one that grants every topic to one secret. The embedded broker has no auth
yet (it answers AUTH with E_AUTH_DISABLED, as nsqd without an auth server),
so this runs on nsqd only.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

import almanet
from almanet.broker.nsqd import find_nsqd, nsqd_process

pytestmark = pytest.mark.asyncio

SECRET = "open sesame"


class AuthServer(http.server.BaseHTTPRequestHandler):
    """nsqd's auth protocol: GET /auth?secret=... answers the identity and what it may do."""

    def do_GET(self) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
        if query.get("secret") != [SECRET]:
            self.send_response(403)
            self.end_headers()
            return
        body = json.dumps(
            {
                "ttl": 3600,
                "identity": "tester",
                "authorizations": [{"topic": ".*", "channels": [".*"], "permissions": ["subscribe", "publish"]}],
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def nsqd_with_auth() -> Iterator[str]:
    executable = find_nsqd()
    if executable is None:
        pytest.skip("needs an nsqd binary to start (ALMANET_NSQD or PATH)")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AuthServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with nsqd_process(executable, f"-auth-http-address=127.0.0.1:{server.server_port}") as (tcp_address, _):
            yield tcp_address
    finally:
        server.shutdown()
        server.server_close()


async def test_calls_and_consuming_work_with_the_secret() -> None:
    with nsqd_with_auth() as address:
        service = almanet.new_service(address, prefix="auth", auth_secret=SECRET)

        @service.procedure
        async def greet(payload: str, **kwargs: Any) -> str:
            return f"hello {payload}"

        async with service, almanet.new_session(address, auth_secret=SECRET) as session:
            assert (await session.call(greet, "you", timeout=10)).payload == "hello you"
            await session.produce("auth.events", {"n": 1})
            async with session.consume("auth.events", "ch") as messages:
                async for message in messages:
                    message.commit()
                    assert message.payload == {"n": 1}
                    break


async def test_without_the_secret_joining_fails_clearly() -> None:
    with nsqd_with_auth() as address, pytest.raises(ConnectionError, match="requires AUTH and no auth_secret"):
        async with almanet.new_session(address):
            pass


async def test_a_wrong_secret_is_refused() -> None:
    with nsqd_with_auth() as address, pytest.raises(ConnectionError, match="E_AUTH_FAILED AUTH failed"):
        async with almanet.new_session(address, auth_secret="wrong"):
            pass
