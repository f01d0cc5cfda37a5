"""Common mistakes with addresses get an error that says what to do."""

from __future__ import annotations

from typing import Any

import pytest

import almanet
from almanet.broker import BrokerOptions
from almanet.nsq import Consumer, Producer
from almanet.pytest_plugin import BrokerAddresses

NO_PORT = r"address 'localhost' has no port: write host:port, e.g\. 127\.0\.0\.1:4150"


@pytest.mark.parametrize(
    "make",
    [
        almanet.new_session,
        almanet.new_service,
        almanet.Session,
        almanet.Service,
        Producer,
        lambda address: Consumer("topic", "channel", print, nsqd_tcp_addresses=[address]),
        lambda address: BrokerOptions(tcp_address=address),
    ],
)
def test_an_address_without_a_port_is_refused_at_construction(make: Any) -> None:
    with pytest.raises(ValueError, match=NO_PORT):
        make("localhost")


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("localhost:", r"'localhost:' has no valid port \(0 to 65535\): write host:port"),
        ("localhost:http", r"'localhost:http' has no valid port"),
        ("localhost:70000", r"'localhost:70000' has no valid port"),
        ("[::1]", r"'\[::1\]' has no port"),
        ("::1:4150", r"write an IPv6 host in brackets, \[host\]:port"),
        ("tcp://127.0.0.1:4150", r"nsqd's TCP addresses are host:port, nsqlookupd's http://host:port"),
        ("http://localhost", r"nsqlookupd address 'http://localhost' is not http://host:port \(with a port\)"),
    ],
)
def test_other_malformed_addresses_say_how_to_write_them(address: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        almanet.new_session("127.0.0.1:4150", address)


def test_addresses_that_are_fine() -> None:
    session = almanet.new_session("127.0.0.1:4150", "[::1]:4150", "localhost:0", "http://127.0.0.1:4161/")
    assert session.nsqd_addresses == ["127.0.0.1:4150", "[::1]:4150", "localhost:0"]
    assert session.lookupd_addresses == ["http://127.0.0.1:4161/"]


ANSWERED_HTTP = (
    r"answered with HTTP: that is nsqd's HTTP port \(4151 by default\); give its TCP port \(4150 by default\)"
)


async def test_nsqds_http_port_is_named_as_such(almanet_broker: BrokerAddresses) -> None:
    """Not ``frame size 1213486160 exceeds the limit`` (b"HTTP" read as a frame size)."""
    with pytest.raises(ConnectionError, match=ANSWERED_HTTP):
        await almanet.new_session(almanet_broker.http_address).join()
    with pytest.raises(ConnectionError, match=ANSWERED_HTTP):
        async with Producer(almanet_broker.http_address):
            pass


async def test_use_addresses_only_while_not_joined(almanet_broker: BrokerAddresses) -> None:
    service = almanet.new_service("127.0.0.1:1", prefix="addresses")
    with pytest.raises(ValueError, match=NO_PORT):
        service.use_addresses("localhost")
    service.use_addresses(almanet_broker.tcp_address)
    async with service:
        assert service.session.nsqd_addresses == [almanet_broker.tcp_address]
        with pytest.raises(RuntimeError, match="only while it is not joined: leave first"):
            service.use_addresses("127.0.0.1:1")
    service.use_addresses("127.0.0.1:1", "http://127.0.0.1:2")  # stopped: it may move again
    assert (service.session.nsqd_addresses, service.session.lookupd_addresses) == (
        ["127.0.0.1:1"],
        ["http://127.0.0.1:2"],
    )
