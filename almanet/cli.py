"""The ``almanet`` command (also ``python -m almanet``)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from collections.abc import Sequence
from typing import Any

from almanet.broker import Broker, BrokerOptions
from almanet.broker.options import parse_duration

_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="almanet", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    broker = commands.add_parser(
        "broker",
        help="run the embedded NSQ-compatible broker",
        description="A single-node, in-memory broker speaking nsqd's TCP protocol V2 and HTTP API. "
        "Flags are nsqd's; durations are Go durations (250ms, 60s, 15m, 1h). Nothing is durable.",
    )
    _add_option_flags(broker)
    broker.add_argument("--log-level", choices=list(_LOG_LEVELS), default="info", help="log level (default: info)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=_LOG_LEVELS[args.log_level], format="[%(name)s] %(asctime)s %(levelname)s: %(message)s", stream=sys.stderr
    )
    settings = {field.name: getattr(args, field.name) for field in dataclasses.fields(BrokerOptions)}
    try:
        server = Broker(**settings)
    except ValueError as error:
        parser.error(str(error))
    asyncio.run(server.serve_until_signal())


def _add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One nsqd flag per ``BrokerOptions`` field, with its default."""
    defaults = BrokerOptions()
    for field in dataclasses.fields(BrokerOptions):
        default = getattr(defaults, field.name)
        convert: Any = {int: int, float: parse_duration, str: str}[type(default)]
        shown = f"{default:g}s" if isinstance(default, float) else repr(default)
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            type=convert,
            default=default,
            metavar="<value>",
            help=f"{field.metadata['help']} (default: {shown})",
        )
