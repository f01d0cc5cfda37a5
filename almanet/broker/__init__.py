"""The embedded NSQ-compatible broker: nsqd's TCP protocol V2 and HTTP API, in memory.

``options`` holds nsqd's settings, ``topics`` the topics and channels,
``tcp`` one client connection, ``output`` when what is sent to it goes out,
``queuescan`` when timed-out and deferred messages come back, ``http`` the
HTTP API (and nsqlookupd's ``/lookup``), ``stats`` the ``/stats`` report,
``server`` the ``Broker`` that ties them together.
"""

from almanet.broker.options import BrokerOptions
from almanet.broker.server import Broker

__all__ = ["Broker", "BrokerOptions"]
