"""Client authorization as nsqd asks an auth server for it (nsqd's ``internal/auth``).

With ``--auth-http-address``, a client's AUTH secret is sent to the auth
server, ``GET /auth?common_name=&remote_ip=&secret=&tls=`` (or the full URL
given), which answers JSON: ``identity``, ``identity_url``, ``ttl`` (seconds,
above 0) and ``authorizations``, each a ``topic`` regular expression, a list
of ``channels`` regular expressions and ``permissions`` (``subscribe``,
``publish``). An expression matches anywhere in the name unless anchored, as
Go's ``MatchString`` does; a publish is checked against the empty channel
name, so only an authorization with a channel expression matching "" allows
it (nsqd's rule). The answer holds for ``ttl`` seconds; then the next check
asks again. Several servers are tried from a random one on, until one answers.

The query blocks (``http.client``): the broker runs it in a thread.
"""

from __future__ import annotations

import http.client
import json
import random
import re
import ssl
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

from almanet.wire.errors import AlmanetError

PERMISSIONS = frozenset({"subscribe", "publish"})


class AuthError(AlmanetError):
    """The auth server could not be asked, or answered what nsqd refuses; only logged, never told the client.

    Neither a ``ConnectionFailed`` nor a ``ProtocolError``: it is about the auth server's HTTP API, not an
    NSQ connection, and a connection failure is one of several causes its message names.
    """


class Authorization:
    """One entry of ``authorizations``: what it allows, on which topics and channels."""

    __slots__ = ("channels", "permissions", "topic")

    def __init__(self, topic: re.Pattern[str], channels: list[re.Pattern[str]], permissions: list[str]) -> None:
        self.topic = topic
        self.channels = channels
        self.permissions = permissions

    def allows(self, topic: str, channel: str) -> bool:
        """Whether it allows subscribing to ``channel`` of ``topic``, or publishing to ``topic`` (``channel`` "")."""
        if ("subscribe" if channel else "publish") not in self.permissions:
            return False
        if self.topic.search(topic) is None:
            return False
        return any(pattern.search(channel) is not None for pattern in self.channels)


class AuthState:
    """An auth server's answer for one client, valid until ``expires`` (``time.monotonic()``)."""

    __slots__ = ("authorizations", "expires", "identity", "identity_url")

    def __init__(self, identity: str, identity_url: str, authorizations: list[Authorization], expires: float) -> None:
        self.identity = identity
        self.identity_url = identity_url
        self.authorizations = authorizations
        self.expires = expires

    def allows(self, topic: str, channel: str) -> bool:
        return any(authorization.allows(topic, channel) for authorization in self.authorizations)

    def expired(self) -> bool:
        return self.expires < time.monotonic()


def query_any(
    addresses: Sequence[str],
    remote_ip: str,
    tls: bool,
    common_name: str,
    secret: bytes,
    context: ssl.SSLContext | None,
    connect_timeout: float,
    request_timeout: float,
) -> AuthState:
    """The first answer of the auth servers, tried from a random one on; ``AuthError`` naming every failure."""
    failures: list[str] = []
    start = random.randrange(len(addresses))
    for index in range(len(addresses)):
        address = addresses[(start + index) % len(addresses)]
        try:
            return query(address, remote_ip, tls, common_name, secret, context, connect_timeout, request_timeout)
        except AuthError as error:
            failures.append(f"failed to auth against {address} - {error}")
    raise AuthError("; ".join(failures))


def query(
    address: str,
    remote_ip: str,
    tls: bool,
    common_name: str,
    secret: bytes,
    context: ssl.SSLContext | None,
    connect_timeout: float,
    request_timeout: float,
) -> AuthState:
    """One auth server's answer: ``address`` is host:port (``/auth`` is asked) or a full URL."""
    # Go's url.Values.Encode: keys sorted, spaces as "+".
    query = urllib.parse.urlencode(
        {"common_name": common_name, "remote_ip": remote_ip, "secret": secret, "tls": "true" if tls else "false"}
    )
    endpoint = f"{address}?{query}" if "://" in address else f"http://{address}/auth?{query}"
    body = _get(endpoint, context, connect_timeout, request_timeout)
    return parse_state(body)


def _get(endpoint: str, context: ssl.SSLContext | None, connect_timeout: float, request_timeout: float) -> bytes:
    url = urllib.parse.urlsplit(endpoint)
    connection: http.client.HTTPConnection
    try:
        if url.scheme == "https":
            connection = http.client.HTTPSConnection(
                url.hostname or "", url.port, timeout=connect_timeout, context=context
            )
        elif url.scheme == "http":
            connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=connect_timeout)
        else:
            raise AuthError(f"unsupported protocol scheme {url.scheme!r}")
        try:
            connection.connect()
            assert connection.sock is not None
            connection.sock.settimeout(request_timeout)
            target = (url.path or "/") + (f"?{url.query}" if url.query else "")
            connection.request("GET", target, headers={"Accept": "application/vnd.nsq; version=1.0"})
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
    except (OSError, http.client.HTTPException, ValueError) as error:
        raise AuthError(str(error) or type(error).__name__) from None
    if response.status != 200:
        raise AuthError(f"got response {response.status} {response.reason} {body!r}")
    return body


def parse_state(body: bytes) -> AuthState:
    """The auth server's JSON, checked as nsqd checks it (types, permissions, expressions, ttl)."""
    try:
        decoded = json.loads(body)
    except ValueError as error:
        raise AuthError(f"invalid JSON: {error}") from None
    if decoded is None:
        decoded = {}
    if not isinstance(decoded, dict):
        raise AuthError("the answer is not a JSON object")
    ttl = _field(decoded, "ttl", int, 0)
    identity = _field(decoded, "identity", str, "")
    identity_url = _field(decoded, "identity_url", str, "")
    authorizations = []
    for entry in _field(decoded, "authorizations", list, []):
        entry = {} if entry is None else entry
        if not isinstance(entry, dict):
            raise AuthError("an authorization is not a JSON object")
        permissions = _strings(entry, "permissions")
        for permission in permissions:
            if permission not in PERMISSIONS:
                raise AuthError(f"unknown permission {permission}")
        topic = _compile(_field(entry, "topic", str, ""), "topic")
        channels = [_compile(channel, "channel") for channel in _strings(entry, "channels")]
        authorizations.append(Authorization(topic, channels, permissions))
    if ttl <= 0:
        raise AuthError(f"invalid TTL {ttl} (must be >0)")
    return AuthState(identity, identity_url, authorizations, time.monotonic() + ttl)


def _field(data: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    """A field as Go's decoder finds it (exact name, else any case); null is the zero value."""
    value = data.get(name)
    if value is None and name not in data:
        value = next((item for key, item in data.items() if key.lower() == name), None)
    if value is None:
        return default
    if type(value) is not kind:
        raise AuthError(f"{name} is not a JSON {kind.__name__}")
    return value


def _strings(data: dict[str, Any], name: str) -> list[str]:
    values: list[Any] = _field(data, name, list, [])
    if not all(isinstance(value, str) for value in values):
        raise AuthError(f"{name} holds a value that is not a string")
    return values


def _compile(pattern: str, what: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise AuthError(f"unable to compile {what} {json.dumps(pattern)} {error}") from None
