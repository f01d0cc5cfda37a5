"""Invocations whose call still runs, kept from timing out on nsqd (TOUCH) until the call's deadline.

nsqd hands an invocation unanswered after its msg_timeout to an instance
again, and the call would run twice. One timer touches every call still
running, each half msg_timeout (the shortest of their connections'); past
its deadline nobody waits for a call's reply, and its invocation is left to
time out.
"""

from __future__ import annotations

import asyncio
import time

from almanet.nsq import Message

_NSQD_MSG_TIMEOUT_MS = 60_000  # nsqd's default, where IDENTIFY's answer does not say


class StillRunning(dict[Message, float]):
    """The invocations kept from timing out, each with its call's deadline (time.time(); inf: none).

    ``keep`` each as its call starts, ``pop(message, None)`` it as it ends: a
    dict, so that the service's check for an empty one costs what a dict's does.
    """

    def __init__(self) -> None:
        super().__init__()
        self._touch_timer: asyncio.TimerHandle | None = None
        self._touch_every = 0.0

    def clear(self) -> None:
        if self._touch_timer is not None:
            self._touch_timer.cancel()
            self._touch_timer = None
        super().clear()

    def keep(self, message: Message, deadline_ms: int) -> None:
        """TOUCH ``message`` while its call runs, until the call's deadline (ms since the epoch; 0: none)."""
        self[message] = deadline_ms / 1000 if deadline_ms else float("inf")
        msg_timeout = message.connection.negotiated.get("msg_timeout", _NSQD_MSG_TIMEOUT_MS) / 1000
        if self._touch_timer is None or msg_timeout / 2 < self._touch_every:
            if self._touch_timer is not None:
                self._touch_timer.cancel()
            self._touch_every = msg_timeout / 2
            self._touch_timer = asyncio.get_running_loop().call_later(self._touch_every, self._touch_still_running)

    def _touch_still_running(self) -> None:
        self._touch_timer = None
        now = time.time()
        for message, deadline in list(self.items()):
            if message.answered or not message.connection_open:  # refused as it left the hold; its connection lost
                del self[message]
            elif deadline > now:
                message.touch()
        if self:
            self._touch_timer = asyncio.get_running_loop().call_later(self._touch_every, self._touch_still_running)
