"""``host:port`` addresses, as nsqd's flags and clients write them."""

from __future__ import annotations


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) → (host, port); ``ValueError`` for anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)
