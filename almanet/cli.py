"""The ``almanet`` command (also ``python -m almanet``)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from almanet.broker import Broker, BrokerOptions
from almanet.broker.options import parse_duration
from almanet.errors import rpc_error
from almanet.loops import LOOPS
from almanet.service import Service
from almanet.session import new_session

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
    serve = commands.add_parser(
        "serve",
        help="run a service: almanet serve module:service",
        description="Import MODULE and serve its Service object SERVICE until SIGINT or SIGTERM.",
    )
    serve.add_argument("service", metavar="MODULE:SERVICE", help="e.g. examples.microservice:service")
    serve.add_argument("--loop", choices=LOOPS, default="asyncio", help="event loop (default: asyncio)")
    call = commands.add_parser(
        "call",
        help="call a procedure and print its result as JSON",
        description="Call URI with the JSON PAYLOAD; print the result as JSON, or the error and exit 1.",
    )
    call.add_argument("uri", help="the procedure's URI, e.g. net.example.greeting")
    call.add_argument("payload", help="the payload as JSON, e.g. '\"Aidar\"'")
    call.add_argument(
        "--address",
        action="append",
        help="an nsqd TCP address host:port, or nsqlookupd's http://host:port (repeatable; default 127.0.0.1:4150)",
    )
    call.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the reply (default: 10)")
    bench = commands.add_parser(
        "bench",
        help="measure almanet end to end on the embedded broker and nsqd, beside NATS and NSQ's Go clients",
        description="Runs every workload with its service and client in processes of their own, on the embedded "
        "broker and on nsqd (ALMANET_NSQD or nsqd on PATH, started on free ports; or the running one --nsqd "
        "names), beside NATS request/reply and JetStream on a nats-server it starts when installed, and NSQ's Go "
        "bench_writer and bench_reader when found (ALMANET_NSQ_BENCH, beside nsqd or on PATH); prints one table.",
    )
    bench.add_argument("--nsqd", metavar="HOST:PORT", help="a running nsqd to measure instead of starting one")
    bench.add_argument("--nsqd-http", metavar="HOST:PORT", help="that nsqd's HTTP address (default: its TCP port + 1)")
    bench.add_argument("--loop", choices=LOOPS, default="asyncio", help="event loop (default: asyncio)")
    bench.add_argument(
        "--pure", action="store_true", help="run almanet with ALMANET_NO_EXTENSIONS=1 (default: compiled)"
    )
    bench.add_argument(
        "--scale", type=float, default=1.0, help="multiplies every message count and run time (default: 1)"
    )
    bench.add_argument(
        "--rounds", type=int, default=5, help="times each workload is measured; the table gives the median (default: 5)"
    )
    for command, default in ((broker, "info"), (serve, "info"), (call, "warn"), (bench, "warn")):
        command.add_argument(
            "--log-level", choices=list(_LOG_LEVELS), default=default, help=f"log level (default: {default})"
        )
    args = parser.parse_args(argv)
    if getattr(args, "loop", "asyncio") == "uvloop" and importlib.util.find_spec("uvloop") is None:
        parser.error("uvloop is not installed: pip install 'almanet[uvloop]'")
    logging.basicConfig(
        level=_LOG_LEVELS[args.log_level], format="[%(name)s] %(asctime)s %(levelname)s: %(message)s", stream=sys.stderr
    )
    if args.command == "broker":
        settings = {field.name: getattr(args, field.name) for field in dataclasses.fields(BrokerOptions)}
        try:
            server = Broker(**settings)
        except ValueError as error:
            parser.error(str(error))
        asyncio.run(server.serve_until_signal())
    elif args.command == "bench":
        if args.rounds < 1 or args.scale <= 0:
            parser.error("--rounds must be at least 1 and --scale above 0")
        try:
            from almanet.bench.runner import Settings, run
        except ImportError:  # the harness is not in the wheel: it runs from a source checkout
            parser.error("almanet bench runs from almanet's source checkout (make bench): it is not in the wheel")
        print(run(Settings(args.nsqd, args.nsqd_http, args.loop, args.pure, args.scale, args.rounds)))
    elif args.command == "serve":
        _load_service(parser, args.service).serve(args.loop)
    else:
        try:
            payload = json.loads(args.payload)
        except ValueError as error:
            parser.error(f"the payload is not JSON: {error}")
        sys.exit(asyncio.run(_call(args.address or ["127.0.0.1:4150"], args.uri, payload, args.timeout)))


def _load_service(parser: argparse.ArgumentParser, spec: str) -> Service:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        parser.error(f"{spec!r} is not MODULE:SERVICE")
    sys.path.insert(0, os.getcwd())  # as python -m does: modules of the current directory
    try:
        service = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        parser.error(f"cannot load {spec}: {error}")
    if not isinstance(service, Service):
        parser.error(f"{spec} is a {type(service).__name__}, not an almanet Service")
    return service


async def _call(addresses: list[str], uri: str, payload: Any, timeout: float) -> int:
    try:
        async with new_session(*addresses) as session:
            reply = await session.call(uri, payload, timeout=timeout)
    except (rpc_error, TimeoutError, ConnectionError, ValueError) as error:
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(json.dumps(reply.payload, default=repr))
    return 0


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
