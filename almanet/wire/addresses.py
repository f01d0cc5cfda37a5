"""``host:port`` addresses, as nsqd's flags and clients write them."""

from __future__ import annotations

EXAMPLE = "127.0.0.1:4150"


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) → (host, port); ``ValueError`` saying how to write it for anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or address.endswith("]"):
        raise ValueError(f"address {address!r} has no port: write host:port, e.g. {EXAMPLE}")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"address {address!r} has no valid port (0 to 65535): write host:port, e.g. {EXAMPLE}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"address {address!r}: write an IPv6 host in brackets, [host]:port, e.g. [::1]:4150")
    return host.strip("[]"), int(port)
