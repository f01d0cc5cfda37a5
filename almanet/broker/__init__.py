"""The embedded NSQ-compatible broker: nsqd's TCP protocol V2 and HTTP API, in memory.

Its modules follow nsqd's files, lowest first:

- ``tls``: nsqd's TLS settings, and how /stats names what a client negotiated.
- ``options``: nsqd's settings.
- ``auth``: asking the auth server of ``--auth-http-address``, and what its answer allows.
- ``output``: when what is sent to a client goes out (nsqd's output buffering).
- ``topics``: topics, and channels with their queued, deferred and in-flight
  messages (``topic.go``, ``channel.go``).
- ``queuescan``: when timed-out and deferred messages come back (``queueScanLoop``).
- ``client``: one client connection's transport, deadlines, IDENTIFY's
  settings, the TLS, snappy and deflate upgrades, and the messages it is sent
  (``client_v2.go``).
- ``commands``: the TCP protocol V2's command handlers, the TLS policy and
  AUTH (``protocol_v2.go``).
- ``protocol``: a connection's commands read and run, one after the other,
  and what ends it (``protocol_v2.go``'s ``IOLoop``).
- ``stats``: the ``/stats`` report (``stats.go``).
- ``httpserver``: an HTTP/1.1 server that behaves as Go's net/http.
- ``http``: nsqd's HTTP API routes, and nsqlookupd's ``/lookup`` and ``/nodes`` (``http.go``).
- ``server``: the ``Broker``, which ties them together.
- ``nsqd``: a real nsqd in a process of its own, for tests and benchmarks.
"""

from almanet.broker.options import BrokerOptions
from almanet.broker.server import Broker

__all__ = ["Broker", "BrokerOptions"]
