"""``/stats`` of the embedded broker, in nsqd's JSON fields and text layout (nsqd/stats.go, http.go)."""

from __future__ import annotations

import platform
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol, cast

if TYPE_CHECKING:
    from almanet.broker.client import Client
    from almanet.broker.topics import Channel, Topic


class StatsSource(Protocol):
    """The broker, as its report sees it."""

    @property
    def version(self) -> str: ...
    @property
    def start_time(self) -> int: ...
    @property
    def topics(self) -> dict[str, Topic]: ...
    @property
    def clients(self) -> set[Client]: ...


# nsqd reports latency percentiles only when configured to; by default none.
_NO_LATENCY: dict[str, Any] = {"count": 0, "percentiles": None}
_SECOND = 1_000_000_000  # nanoseconds


def stats(
    broker: StatsSource, topic_name: str | None, channel_name: str | None, include_clients: bool
) -> dict[str, Any]:
    """What nsqd's ``/stats?format=json`` answers (without ``memory``: there is no Go heap).

    Filtered as nsqd's GetStats filters: an unknown topic gives ``null`` topics
    and producers, and a topic without the channel is left out.
    """
    if topic_name is None:
        topics = [topic for _, topic in sorted(broker.topics.items())]
    elif topic_name in broker.topics:
        topics = [broker.topics[topic_name]]
    else:
        return _report(broker, None, None)
    topic_reports = [
        _topic(topic, channel_name, topic_name, include_clients)
        for topic in topics
        if channel_name is None or channel_name in topic.channels
    ]
    if not include_clients:
        return _report(broker, topic_reports, None)
    producers = [_client(client, topic_name) for client in broker.clients if client.pub_counts]
    return _report(broker, topic_reports, producers or None)


def _report(
    broker: StatsSource, topics: list[dict[str, Any]] | None, producers: list[dict[str, Any]] | None
) -> dict[str, Any]:
    return {
        "version": broker.version,
        "health": "OK",
        "start_time": broker.start_time,
        "topics": topics,
        "producers": producers,
    }


def _topic(topic: Topic, channel_name: str | None, topic_filter: str | None, include_clients: bool) -> dict[str, Any]:
    channels = sorted(topic.channels.items())
    return {
        "topic_name": topic.name,
        "channels": [
            _channel(channel, topic_filter, include_clients)
            for name, channel in channels
            if channel_name in (None, name)
        ],
        "depth": len(topic.waiting),
        "backend_depth": 0,
        "message_count": topic.message_count,
        "message_bytes": topic.message_bytes,
        "paused": False,
        "e2e_processing_latency": _NO_LATENCY,
    }


def _channel(channel: Channel, topic_filter: str | None, include_clients: bool) -> dict[str, Any]:
    return {
        "channel_name": channel.name,
        "depth": len(channel.queue),
        "backend_depth": 0,
        "in_flight_count": channel.in_flight_count,
        "deferred_count": channel.deferred_count,
        "message_count": channel.message_count,
        "requeue_count": channel.requeue_count,
        "timeout_count": channel.timeout_count,
        "client_count": len(channel.clients),
        # The broker's channels have no other consumers than its client connections.
        "clients": [_client(cast("Client", client), topic_filter) for client in channel.clients]
        if include_clients
        else None,
        "paused": False,
        "e2e_processing_latency": _NO_LATENCY,
    }


def _client(client: Client, topic_filter: str | None) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "client_id": client.client_id,
        "hostname": client.hostname,
        "version": "V2",
        "remote_address": client.remote_address,
        "state": client.state,
        "ready_count": client.ready_count,
        "in_flight_count": client.in_flight_count,
        "message_count": client.message_count,
        "finish_count": client.finish_count,
        "requeue_count": client.requeue_count,
        "connect_ts": client.connect_ts,
        "sample_rate": client.sample_rate,
        "deflate": client.deflate,
        "snappy": client.snappy,
        "user_agent": client.user_agent,
    }
    # Left out when false or empty (omitempty), as nsqd leaves them out.
    auth_state = client.auth_state
    if auth_state is not None:
        if auth_state.authorizations:
            fields["authed"] = True
        if auth_state.identity:
            fields["auth_identity"] = auth_state.identity
        if auth_state.identity_url:
            fields["auth_identity_url"] = auth_state.identity_url
    # nsqd reports a single topic's count (ClientV2.Stats breaks out of its loop), the filtered topic's if any.
    for topic, count in client.pub_counts.items():
        if topic_filter in (None, topic):
            fields["pub_counts"] = [{"topic": topic, "count": count}]
            break
    tls = client.tls
    fields.update(
        tls=tls is not None,
        tls_cipher_suite=tls.cipher_suite if tls is not None else "",
        tls_version=tls.version if tls is not None else "",
        # nsqd offers no ALPN protocols; Go's deprecated NegotiatedProtocolIsMutual is always true.
        tls_negotiated_protocol="",
        tls_negotiated_protocol_is_mutual=tls is not None,
    )
    return fields


def stats_text(broker: StatsSource, report: dict[str, Any]) -> str:
    """nsqd's plain-text ``/stats`` for a report made by ``stats()``, written as nsqd's printStats writes it."""
    now_ns = time.time_ns()
    start = datetime.fromtimestamp(broker.start_time, timezone.utc).astimezone()
    out = [
        # nsqd names the Go release it was built with.
        f"nsqd v{broker.version} (built w/python{platform.python_version()})\n",
        f"start_time {start.isoformat(timespec='seconds').replace('+00:00', 'Z')}\n",
        f"uptime {_go_duration(max(0, now_ns - broker.start_time * _SECOND))}\n",
        f"\nHealth: {report['health']}\n",
    ]
    topics = report["topics"] or []
    out.append("\nTopics:" if topics else "\nTopics: None\n")
    for topic in topics:
        out.append(
            f"\n   [{topic['topic_name']:<15}] depth: {topic['depth']:<5} be-depth: {topic['backend_depth']:<5} "
            f"msgs: {topic['message_count']:<8} e2e%: \n"
        )
        for channel in topic["channels"]:
            out.append(
                f"      [{channel['channel_name']:<25}] depth: {channel['depth']:<5} "
                f"be-depth: {channel['backend_depth']:<5} inflt: {channel['in_flight_count']:<4} "
                f"def: {channel['deferred_count']:<4} re-q: {channel['requeue_count']:<5} "
                f"timeout: {channel['timeout_count']:<5} msgs: {channel['message_count']:<8} e2e%: \n"
            )
            out.extend(f"        {_client_text(client, now_ns)}\n" for client in channel["clients"] or [])
    producers = report["producers"] or []
    out.append("\nProducers:\n" if producers else "\nProducers: None\n")
    out.extend(f"   {_client_text(client, now_ns)}\n" for client in producers)
    return "".join(out)


def _client_text(client: dict[str, Any], now_ns: int) -> str:
    # nsqd truncates the connection's age to the second.
    connected = _go_duration(max(0, now_ns // _SECOND - client["connect_ts"]) * _SECOND)
    port = client["remote_address"].rpartition(":")[2]
    name = f"{client['hostname']}:{port} {client['user_agent']}"
    if "pub_counts" in client:
        total = sum(entry["count"] for entry in client["pub_counts"])
        topics = ",".join(f"{entry['topic']}={entry['count']}" for entry in client["pub_counts"])
        return f"[V2 {name:<21}] msgs: {total:<8} topics: {topics} connected: {connected}"
    return (
        f"[V2 {name:<21}] state: {client['state']} inflt: {client['in_flight_count']:<4} "
        f"rdy: {client['ready_count']:<4} fin: {client['finish_count']:<8} re-q: {client['requeue_count']:<8} "
        f"msgs: {client['message_count']:<8} connected: {connected}"
    )


def _go_duration(nanoseconds: int) -> str:
    """Go's ``Duration.String()``: ``1h2m3.5s``, ``1.5ms``, ``0s``."""
    if nanoseconds == 0:
        return "0s"
    for unit, size in (("ns", 1), ("µs", 1_000), ("ms", 1_000_000)):
        if nanoseconds < size * 1000:
            return _decimal(nanoseconds, size) + unit
    minutes, nanoseconds = divmod(nanoseconds, 60 * _SECOND)
    hours, minutes = divmod(minutes, 60)
    seconds = _decimal(nanoseconds, _SECOND) + "s"
    if hours:
        return f"{hours}h{minutes}m{seconds}"
    if minutes:
        return f"{minutes}m{seconds}"
    return seconds


def _decimal(value: int, unit: int) -> str:
    """``value / unit`` as Go writes it in durations: no trailing zeros, no point for a whole number."""
    whole, fraction = divmod(value, unit)
    digits = f"{fraction:0{len(str(unit)) - 1}d}".rstrip("0") if fraction else ""
    return f"{whole}.{digits}" if digits else str(whole)
