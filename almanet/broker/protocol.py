"""nsqd's TCP protocol V2 on one connection (its ``protocol_v2.go`` ``IOLoop``): commands read and run.

What a client sends is parsed into commands, each run by its handler in
``commands`` as it comes, at most ``_COMMANDS_PER_ITERATION`` in a loop
iteration. A refused command (``CommandError``) is answered with its error
frame, and the connection closed; a ``ProtocolError`` of the parser (a line
too long, a stream cut) closes it without one, as nsqd does. A command that
waits for something (a TLS handshake, the auth server) returns it: reading
stops until it is done, then the commands sent after it run. Reading also
stops while the client does not read what it is sent (``client.Client``).
What a client is sent, and when, is for ``client`` and ``output`` to say.
"""

from __future__ import annotations

import asyncio
import logging

from almanet._speedups.frames import CommandParser, encode_error, split_mpub
from almanet.broker.client import Client
from almanet.broker.commands import Commands, Nsqd, Wait, refused_before_tls
from almanet.wire.errors import CommandError, ProtocolError
from almanet.wire.protocol import MAGIC_V2

logger = logging.getLogger("almanet.broker")

# The most commands of one client run in one loop iteration: one read may inflate to 16 MiB of them,
# 4 million NOPs, a second of the loop's time if run in one go.
_COMMANDS_PER_ITERATION = 4096


class ProtocolV2(Client):
    """One client connection speaking nsqd's protocol V2."""

    def __init__(self, nsqd: Nsqd) -> None:
        super().__init__(nsqd.options, nsqd.new_client_id(), nsqd.clients)
        options = nsqd.options
        self._max_req_timeout_ms = nsqd.max_req_timeout_ms
        self._parser = CommandParser(options.max_msg_size, options.max_body_size, nsqd.max_req_timeout_ms)
        # nsqd makes a client of a connection, with its message pump, heartbeats
        # and read deadline, once the protocol magic has come.
        self._magic_bytes_due = len(MAGIC_V2)
        self._unparsed: list[bytes] = []  # the reads holding what the parser has not made a command of yet
        self._held: asyncio.Task[None] | None = None  # what the held commands wait for
        self._commands = Commands(self, nsqd, self._restart_parser)

    # --- reading commands -------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._decompress is not None:
            try:
                data = self._decompress(data)
            except ProtocolError as error:  # a corrupt stream
                logger.debug("closing %s: %s", self.remote_address, error)
                self.close()
                return
        if self._magic_bytes_due:
            self._magic_bytes_due = max(0, self._magic_bytes_due - len(data))
            if not self._magic_bytes_due:
                self.start()
        self._parser.feed(data)
        if self.reading_held:
            self._note_unparsed(data)  # read before reading paused: run once the hold ends
            return
        self._run_commands(data)

    def _run_commands(self, data: bytes) -> None:
        """Run the commands the parser holds, until one waits for something; ``data`` is the latest read."""
        parser = self._parser
        commands = self._commands
        handlers = commands.handlers
        command = None
        wait: Wait | None = None
        run = 0
        try:
            for command in parser:
                wait = handlers[command.name](command)
                if wait is not None:
                    break
                if self.closed:
                    return
                run += 1
                if run == _COMMANDS_PER_ITERATION:  # a flood (an inflated bomb of NOPs): the others' turn first
                    wait = asyncio.sleep(0)
                    break
        except CommandError as error:
            if commands.awaiting_tls and error.code != "E_BAD_PROTOCOL":
                # Before TLS nsqd refuses any command but IDENTIFY before reading further.
                error = self._refusal_before_tls(data) or error
            self.send(encode_error(error.data))
            self.close()
            return
        except ProtocolError as error:
            logger.debug("closing %s: %s", self.remote_address, error)
            self.close()
            return
        if command is not None:
            # nsqd's read deadline runs from one whole command to the next:
            # a command trickling in byte by byte does not put it off.
            self._last_read = self._loop.time()
        self._note_unparsed(data)
        if wait is not None:
            self._hold(wait)
            return
        if commands.awaiting_tls and parser.buffered:
            refusal = self._refusal_before_tls(data)
            if refusal is not None:  # its line came, its body need not
                self.send(encode_error(refusal.data))
                self.close()
                return
        if commands.finished:
            # The channel refills the RDY slots FINs freed once per read, not once per FIN.
            commands.finished = False
            assert self.channel is not None
            self.channel.dispatch()

    def _note_unparsed(self, data: bytes) -> None:
        """Keep the reads that hold what the parser has not made a command of yet."""
        unparsed = self._parser.buffered
        if unparsed > len(data):
            if data:  # a hold's continuation reads nothing new
                self._unparsed.append(data)
        elif unparsed:
            self._unparsed = [data]
        elif self._unparsed:
            self._unparsed = []

    def _pending_bytes(self, data: bytes) -> bytes:
        """What the parser holds, ``data`` (the latest read, not noted yet) included."""
        unparsed = self._parser.buffered
        if not unparsed:
            return b""
        reads = self._unparsed if self._unparsed and self._unparsed[-1] is data else [*self._unparsed, data]
        return b"".join(reads)[-unparsed:]

    def _restart_parser(self) -> None:
        """A new parser, past the protocol magic: what was read and not run yet is dropped."""
        options = self.options
        self._parser = CommandParser(options.max_msg_size, options.max_body_size, self._max_req_timeout_ms)
        self._parser.feed(MAGIC_V2)
        self._unparsed = []

    def _refusal_before_tls(self, data: bytes) -> CommandError | None:
        """nsqd's refusal of the command whose line the parser holds (None for IDENTIFY, or before its line ends)."""
        pending = self._pending_bytes(data)
        line_end = pending.find(b"\n")
        if line_end < 0:
            return None
        name = pending[:line_end].removesuffix(b"\r").split(b" ", 1)[0]
        if name == b"IDENTIFY":
            return None
        return refused_before_tls(name)

    # --- holding commands -------------------------------------------------

    def _hold(self, wait: Wait) -> None:
        """Read and run no more commands until ``wait`` is done."""
        self.reading_held = True
        if self._transport is not None:
            self._transport.pause_reading()
        self._held = self._loop.create_task(self._run_held(wait))

    async def _run_held(self, wait: Wait) -> None:
        try:
            await wait
        except CommandError as error:
            if not self.closed:
                self.send(encode_error(error.data))
                self.close()
            return
        except Exception:
            logger.exception("closing %s: a command failed", self.remote_address)
            self.abort()
            return
        finally:
            self._held = None
        if self.closed:
            return
        self.reading_held = False
        self._last_read = self._loop.time()
        self._run_commands(b"")
        if not self.closed and not self.reading_held and not self.writing_paused and self._transport is not None:
            self._transport.resume_reading()

    # --- the end of the connection ----------------------------------------

    def eof_received(self) -> bool:
        self._refuse_cut_short_command()
        self.close()
        return self.tls is None  # keep writing what is pending; TLS has no half-closed connection

    def _read_timed_out(self) -> None:
        self._refuse_cut_short_command()
        self.close()

    def _refuse_cut_short_command(self) -> None:
        """nsqd's error for a command whose body stops coming (end of stream, read deadline)."""
        unparsed = self._parser.buffered
        if unparsed and not self.closed:
            options = self.options
            error = _cut_short_error(b"".join(self._unparsed)[-unparsed:], options.max_msg_size, options.max_body_size)
            if error is not None:
                self.send(encode_error(error.data))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        super().connection_lost(exc)
        held = self._held
        if held is not None and held is not asyncio.current_task():
            held.cancel()  # a thread asking the auth server finishes on its own
        channel = self.channel
        if channel is not None and not channel.deleted:
            channel.remove_client(self)


# What nsqd says when a body command's size or body stops coming, by command.
_CUT_SHORT_SIZE = {
    b"IDENTIFY": ("E_BAD_BODY", "IDENTIFY failed to read body size"),
    b"AUTH": ("E_BAD_BODY", "AUTH failed to read body size"),
    b"PUB": ("E_BAD_MESSAGE", "PUB failed to read message body size"),
    b"DPUB": ("E_BAD_MESSAGE", "DPUB failed to read message body size"),
    b"MPUB": ("E_BAD_BODY", "MPUB failed to read body size"),
}
_CUT_SHORT_BODY = {
    b"IDENTIFY": ("E_BAD_BODY", "IDENTIFY failed to read body"),
    b"AUTH": ("E_BAD_BODY", "AUTH failed to read body"),
    b"PUB": ("E_BAD_MESSAGE", "PUB failed to read message body"),
    b"DPUB": ("E_BAD_MESSAGE", "DPUB failed to read message body"),
}


def _cut_short_error(pending: bytes, max_msg_size: int, max_body_size: int) -> CommandError | None:
    """nsqd's error for the command ``pending`` begins, cut short; None while its line is incomplete.

    The parser has checked whatever of it came before the cut.
    """
    line_end = pending.find(b"\n")
    if line_end < 0:
        return None  # nsqd closes without a word
    name = pending[:line_end].split(b" ", 1)[0].removesuffix(b"\r")
    size_at = line_end + 1
    if len(pending) - size_at < 4:
        return CommandError(*_CUT_SHORT_SIZE[name])
    if name != b"MPUB":
        return CommandError(*_CUT_SHORT_BODY[name])
    # nsqd reads MPUB's messages one by one: the error is about the first one cut short.
    try:
        split_mpub(pending, size_at + 4, len(pending), max_msg_size, max_body_size)
    except CommandError as error:
        return error
    return None
