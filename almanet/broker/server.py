"""The embedded broker: its topics, clients and listening sockets."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import socket
import ssl
import time
from typing import Any

from almanet import loops
from almanet._version import __version__
from almanet.broker.client import Client
from almanet.broker.http import API
from almanet.broker.httpserver import HTTPConnection
from almanet.broker.options import BrokerOptions
from almanet.broker.protocol import ProtocolV2
from almanet.broker.queuescan import QueueScan
from almanet.broker.tls import cipher_numbers, client_context, server_context
from almanet.broker.topics import Channel, Topic
from almanet.wire.addresses import split_address
from almanet.wire.compression import snappy_available

logger = logging.getLogger("almanet.broker")


def _default_broadcast_address(tcp_address: str) -> str:
    """The host clients reach the broker at: its TCP host when that is loopback (the default), else the hostname."""
    host = split_address(tcp_address)[0]
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name
        loopback = False
    return host if loopback else socket.gethostname()


class Broker:
    """A single-node, in-memory broker speaking nsqd's TCP protocol V2 and HTTP API.

    ``Broker(**settings)`` takes the fields of ``BrokerOptions``. Use it as
    ``async with Broker(tcp_address="127.0.0.1:0", ...) as broker:`` or with
    ``await start()`` and ``await stop()``; once started, ``tcp_address`` and
    ``http_address`` tell where it listens (the ports it bound for port 0).
    """

    def __init__(self, **settings: Any) -> None:
        self.options = BrokerOptions(**settings)
        self.version = __version__
        self.max_req_timeout_ms = round(self.options.max_req_timeout * 1000)
        self.broadcast_address = self.options.broadcast_address or _default_broadcast_address(self.options.tcp_address)
        options = self.options
        # TLS as nsqd builds it at start: ValueError when the files do not load.
        self.tls_context: ssl.SSLContext | None = server_context(
            options.tls_cert,
            options.tls_key,
            options.tls_client_auth_policy,
            options.tls_root_ca_file,
            options.tls_min_version,
        )
        self.tls_cipher_numbers = cipher_numbers(self.tls_context) if self.tls_context is not None else {}
        self.auth_tls_context: ssl.SSLContext | None = (
            client_context(options.tls_root_ca_file, options.tls_min_version) if options.auth_http_addresses else None
        )
        self.start_time = 0
        self.topics: dict[str, Topic] = {}
        self.clients: set[Client] = set()
        self._http_connections: set[HTTPConnection] = set()
        self._message_ids = itertools.count(1)
        self._client_ids = itertools.count(1)
        self._servers: list[asyncio.Server] = []
        self._queue_scan = QueueScan(self._channels)
        self._api = API(self)
        self.tcp_address = ""
        self.http_address = ""

    async def __aenter__(self) -> Broker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def tcp_port(self) -> int:
        return split_address(self.tcp_address)[1]

    @property
    def http_port(self) -> int:
        return split_address(self.http_address)[1]

    async def start(self) -> None:
        """Listen on the TCP and HTTP addresses."""
        if self._servers:
            raise RuntimeError("the broker is already started")
        loop = asyncio.get_running_loop()
        self.start_time = int(time.time())
        try:
            tcp = await loop.create_server(lambda: ProtocolV2(self), *split_address(self.options.tcp_address))
            self._servers.append(tcp)
            http = await loop.create_server(
                lambda: HTTPConnection(self._api, self._http_connections), *split_address(self.options.http_address)
            )
            self._servers.append(http)
        except BaseException:
            await self.stop()
            raise
        self.tcp_address = _bound_address(tcp)
        self.http_address = _bound_address(http)
        self._queue_scan.start()
        if self.options.snappy and not snappy_available():  # nsqd's default: said, not warned, where it cannot be
            logger.info("snappy is not offered to clients: it needs cramjam (pip install 'almanet[snappy]')")
        logger.info("TCP: listening on %s", self.tcp_address)
        logger.info("HTTP: listening on %s", self.http_address)

    async def stop(self) -> None:
        """Stop listening, close every connection and drop the messages (nothing is durable)."""
        servers, self._servers = self._servers, []
        self._queue_scan.stop()
        for server in servers:
            server.close()
        # Closing would wait for clients that do not read.
        for client in list(self.clients):
            client.abort()
        for http_connection in list(self._http_connections):
            http_connection.abort()
        for topic in list(self.topics.values()):
            topic.delete()
        for server in servers:
            await server.wait_closed()

    async def serve_until_signal(self) -> None:
        """Run until SIGINT or SIGTERM, then stop cleanly."""
        await loops.serve_until_signal(self.start, self.stop)

    def new_message_id(self) -> bytes:
        """16 hex digits, like nsqd's message ids."""
        return b"%016x" % next(self._message_ids)

    def new_client_id(self) -> int:
        """A number no other client of this broker has had, as nsqd numbers its clients."""
        return next(self._client_ids)

    def get_topic(self, name: str) -> Topic:
        """The topic named ``name`` (already validated), created if need be."""
        topic = self.topics.get(name)
        if topic is None:
            topic = self.topics[name] = Topic(name, self.options.mem_queue_size, self.new_message_id, self._forget)
        return topic

    def _channels(self) -> list[Channel]:
        return [channel for topic in self.topics.values() for channel in topic.channels.values()]

    def _forget(self, topic: Topic) -> None:
        if self.topics.get(topic.name) is topic:
            del self.topics[topic.name]


def _bound_address(server: asyncio.Server) -> str:
    host, port = server.sockets[0].getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
