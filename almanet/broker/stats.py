"""``/stats`` of the embedded broker, in nsqd's JSON fields and text layout (nsqd/stats.go, http.go)."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from almanet.broker.server import Broker
    from almanet.broker.tcp import ClientConnection
    from almanet.broker.topics import Channel, Topic

# nsqd reports latency percentiles only when configured to; by default none.
_NO_LATENCY: dict[str, Any] = {"count": 0, "percentiles": None}


def stats(broker: Broker, topic_name: str | None, channel_name: str | None, include_clients: bool) -> dict[str, Any]:
    """What nsqd's ``/stats?format=json`` answers (without ``memory``: there is no Go heap)."""
    if topic_name is None:
        topics: list[dict[str, Any]] | None = [
            _topic(topic, channel_name, include_clients) for _, topic in sorted(broker.topics.items())
        ]
    else:
        topic = broker.topics.get(topic_name)
        topics = None if topic is None else [_topic(topic, channel_name, include_clients)]
    producers = [_client(client) for client in broker.clients if client.pub_counts] if include_clients else []
    return {
        "version": broker.version,
        "health": "OK",
        "start_time": broker.start_time,
        "topics": topics,
        "producers": producers or None,
    }


def _topic(topic: Topic, channel_name: str | None, include_clients: bool) -> dict[str, Any]:
    channels = sorted(topic.channels.items())
    return {
        "topic_name": topic.name,
        "channels": [_channel(channel, include_clients) for name, channel in channels if channel_name in (None, name)],
        "depth": len(topic.waiting),
        "backend_depth": 0,
        "message_count": topic.message_count,
        "message_bytes": topic.message_bytes,
        "paused": False,
        "e2e_processing_latency": _NO_LATENCY,
    }


def _channel(channel: Channel, include_clients: bool) -> dict[str, Any]:
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
        "clients": [_client(client) for client in channel.clients] if include_clients else None,
        "paused": False,
        "e2e_processing_latency": _NO_LATENCY,
    }


def _client(client: ClientConnection) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "client_id": client.client_id,
        "hostname": client.hostname,
        "version": "V2",
        "remote_address": client.remote_address,
        "state": client.state,
        "ready_count": client.ready_count,
        "in_flight_count": len(client.in_flight),
        "message_count": client.message_count,
        "finish_count": client.finish_count,
        "requeue_count": client.requeue_count,
        "connect_ts": client.connect_ts,
        "sample_rate": client.sample_rate,
        "deflate": False,
        "snappy": False,
        "user_agent": client.user_agent,
    }
    if client.pub_counts:
        fields["pub_counts"] = [{"topic": topic, "count": count} for topic, count in client.pub_counts.items()]
    fields.update(
        tls=False,
        tls_cipher_suite="",
        tls_version="",
        tls_negotiated_protocol="",
        tls_negotiated_protocol_is_mutual=False,
    )
    return fields


def stats_text(broker: Broker, report: dict[str, Any]) -> str:
    """nsqd's plain-text ``/stats`` for a report made by ``stats()``, written as nsqd's printStats writes it."""
    now = time.time()
    start = datetime.fromtimestamp(broker.start_time, timezone.utc).astimezone()
    out = [
        f"nsqd v{broker.version} (almanet embedded broker)\n",
        f"start_time {start.isoformat(timespec='seconds').replace('+00:00', 'Z')}\n",
        f"uptime {_go_duration(now - broker.start_time)}\n",
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
            out.extend(f"        {_client_text(client, now)}\n" for client in channel["clients"] or [])
    producers = report["producers"] or []
    out.append("\nProducers:\n" if producers else "\nProducers: None\n")
    out.extend(f"   {_client_text(client, now)}\n" for client in producers)
    return "".join(out)


def _client_text(client: dict[str, Any], now: float) -> str:
    connected = _go_duration(int(now - client["connect_ts"]))
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


def _go_duration(seconds: float) -> str:
    """Go's ``Duration.String()`` to the second or below: ``1h2m3.5s``."""
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    fraction = f"{seconds - whole:.6f}".rstrip("0").rstrip(".")[1:] if seconds != whole else ""
    text = f"{secs}{fraction}s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text
