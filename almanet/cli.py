"""The ``almanet`` command (also ``python -m almanet``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from almanet import workers
from almanet._version import __version__
from almanet.asyncapi import describe as describe_service
from almanet.broker import Broker, BrokerOptions
from almanet.broker.options import parse_bool, parse_duration
from almanet.errors import rpc_error
from almanet.loops import LOG_FORMAT, LOOPS, default_loop
from almanet.nsq import ConnectionOptions
from almanet.service import Service
from almanet.session import new_session

# Addresses of almanet serve and almanet call when no --address is given: comma-separated.
ADDRESSES_VARIABLE = "ALMANET_ADDRESSES"
# The secret almanet serve and almanet call AUTH with when no --auth-secret is given.
AUTH_SECRET_VARIABLE = "ALMANET_AUTH_SECRET"
_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # almanet serve --workers runs it in each worker
    if getattr(args, "loop", "asyncio") == "uvloop" and importlib.util.find_spec("uvloop") is None:
        parser.error("uvloop is not installed: pip install 'almanet[uvloop]'")
    logging.basicConfig(level=_LOG_LEVELS[args.log_level], format=LOG_FORMAT, stream=sys.stderr)
    args.run(parser, args)


def _parser() -> argparse.ArgumentParser:
    """The command line: one subcommand each, whose ``run`` takes the parser (for its errors) and the arguments."""
    parser = argparse.ArgumentParser(
        prog="almanet", description="Routed RPC and produce/consume over NSQ (also: python -m almanet)."
    )
    parser.add_argument("--version", action="version", version=f"almanet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_broker(commands)
    _add_serve(commands)
    _add_call(commands)
    _add_describe(commands)
    # The bench harness is in almanet's source checkout, not in the wheel: offered only where it is.
    if importlib.util.find_spec("almanet.bench") is not None:
        _add_bench(commands)
    return parser


def _add_broker(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    broker: argparse.ArgumentParser = commands.add_parser(
        "broker",
        help="run the embedded NSQ-compatible broker",
        description="A single-node, in-memory broker speaking nsqd's TCP protocol V2 and HTTP API. "
        "Flags are nsqd's; durations are Go durations (250ms, 60s, 15m, 1h). Nothing is durable.",
    )
    _add_option_flags(broker)
    _add_log_level(broker, "info")
    broker.set_defaults(run=_run_broker)


def _run_broker(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    settings = {field.name: getattr(args, field.name) for field in dataclasses.fields(BrokerOptions)}
    try:
        server = Broker(**settings)
    except ValueError as error:
        parser.error(str(error))
    with contextlib.suppress(asyncio.CancelledError):  # a second signal while it stopped: at once, quietly
        asyncio.run(server.serve_until_signal())


def _add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve: argparse.ArgumentParser = commands.add_parser(
        "serve",
        help="run a service: almanet serve module:service",
        description="Import MODULE and serve its Service object SERVICE until SIGINT or SIGTERM.",
    )
    serve.add_argument("service", metavar="MODULE:SERVICE", help="e.g. examples.microservice:service")
    serve.add_argument("--loop", choices=LOOPS, help="event loop (default: uvloop when installed, else asyncio)")
    serve.add_argument(
        "--address",
        action="append",
        help="an nsqd TCP address host:port, or nsqlookupd's http://host:port (repeatable; default: "
        f"{ADDRESSES_VARIABLE}, comma-separated, else the addresses the code gives)",
    )
    serve.add_argument(
        "--lookupd-poll-interval",
        type=_above_zero,
        metavar="SECONDS",
        help="how often to ask nsqlookupd for the nsqd of the cluster (default: the code's, else 5)",
    )
    serve.add_argument(
        "--workers",
        type=_at_least_one,
        default=1,
        metavar="N",
        help="run N processes of the service, each with its own event loop, on one channel; one SIGTERM "
        "stops them all, and one that dies is started again (default: 1, this process)",
    )
    _add_connection_flags(serve)
    _add_log_level(serve, "info")
    serve.set_defaults(run=_run_serve)


def _run_serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    service = _load_service(parser, args.service)
    addresses = _addresses(args.address)
    if addresses:  # instead of the code's
        try:
            service.use_addresses(*addresses)
        except ValueError as error:
            parser.error(str(error))
    connection = _connection_options(parser, args)
    if connection:  # instead of the code's
        service.use_options(**connection)
    if args.lookupd_poll_interval is not None:
        service.session.lookupd_poll_interval = args.lookupd_poll_interval
    if args.workers > 1:  # each worker does all the above again; an error in it was said here first
        worker = [sys.executable, "-m", "almanet", *args.argv, "--workers", "1"]  # the last --workers counts
        sys.exit(asyncio.run(workers.supervise(worker, args.workers)))
    service.serve(args.loop)


def _add_call(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    call: argparse.ArgumentParser = commands.add_parser(
        "call",
        help="call a procedure and print its result as JSON",
        description="Call URI with the JSON PAYLOAD; print the result as JSON, or the error and exit 1.",
    )
    call.add_argument("uri", help="the procedure's URI, e.g. net.example.greeting")
    call.add_argument("payload", help="the payload as JSON, e.g. '\"Aidar\"'")
    call.add_argument(
        "--address",
        action="append",
        help="an nsqd TCP address host:port, or nsqlookupd's http://host:port (repeatable; default: "
        f"{ADDRESSES_VARIABLE}, comma-separated, else 127.0.0.1:4150)",
    )
    call.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the reply (default: 10)")
    _add_connection_flags(call)
    _add_log_level(call, "warn")
    call.set_defaults(run=_run_call)


def _run_call(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        payload = json.loads(args.payload)
    except ValueError as error:
        parser.error(f"the payload is not JSON: {error}")
    connection = _connection_options(parser, args)
    addresses = _addresses(args.address) or ["127.0.0.1:4150"]
    sys.exit(asyncio.run(_call(addresses, args.uri, payload, args.timeout, connection)))


def _add_describe(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    describe: argparse.ArgumentParser = commands.add_parser(
        "describe",
        help="print a service's API as an AsyncAPI 3.0 document (JSON)",
        description="Import MODULE and print the AsyncAPI 3.0 document of its Service object SERVICE: every "
        "procedure's URI, NSQ channel, payload and result JSON Schema, the errors it may raise, its docstring.",
    )
    describe.add_argument("service", metavar="MODULE:SERVICE", help="e.g. examples.microservice:service")
    describe.add_argument("--title", help="the API's title (default: the service's prefix)")
    describe.add_argument("--api-version", help="the API's version (default: almanet's)")
    describe.add_argument("--output", metavar="FILE", help="write the document to FILE (default: stdout)")
    _add_log_level(describe, "warn")
    describe.set_defaults(run=_run_describe)


def _run_describe(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    document = describe_service(_load_service(parser, args.service), title=args.title, version=args.api_version)
    text = json.dumps(document, indent=2) + "\n"
    if args.output:
        with open(args.output, "w", encoding="utf-8") as output:
            output.write(text)
    else:
        sys.stdout.write(text)


def _add_bench(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench: argparse.ArgumentParser = commands.add_parser(
        "bench",
        help="measure almanet end to end on the embedded broker and nsqd, beside NATS and NSQ's Go clients",
        description="Runs every workload with its service and client in processes of their own, on the embedded "
        "broker and on nsqd (ALMANET_NSQD or nsqd on PATH, started on free ports; or the running one --nsqd "
        "names), beside NATS request/reply and JetStream on a nats-server it starts when installed, and NSQ's Go "
        "bench_writer and bench_reader when found (ALMANET_NSQ_BENCH, beside nsqd or on PATH); prints a table, then "
        "one of RPC on a 3-nsqd cluster beside one nsqd when nsqd and nsqlookupd are found.",
    )
    bench.add_argument("--nsqd", metavar="HOST:PORT", help="a running nsqd to measure instead of starting one")
    bench.add_argument("--nsqd-http", metavar="HOST:PORT", help="that nsqd's HTTP address (default: its TCP port + 1)")
    bench.add_argument(
        "--loop", choices=LOOPS, help="event loop of almanet and NATS alike (default: uvloop when installed, as serve)"
    )
    bench.add_argument(
        "--pure", action="store_true", help="run almanet with ALMANET_NO_EXTENSIONS=1 (default: compiled)"
    )
    bench.add_argument(
        "--scale", type=_above_zero, default=1.0, help="multiplies every message count and run time (default: 1)"
    )
    bench.add_argument(
        "--rounds",
        type=_at_least_one,
        default=5,
        help="times each workload is measured; the table gives the median (default: 5)",
    )
    bench.add_argument(
        "--only",
        choices=["cluster"],
        help="measure one section only: cluster, RPC on a 3-nsqd cluster beside one nsqd (it needs nsqd and "
        "nsqlookupd: ALMANET_NSQLOOKUPD, beside nsqd or on PATH)",
    )
    _add_log_level(bench, "warn")
    bench.set_defaults(run=_run_bench)


def _run_bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from almanet.bench.runner import Settings, run

    loop = args.loop or default_loop()
    print(run(Settings(args.nsqd, args.nsqd_http, loop, args.pure, args.scale, args.rounds, args.only)))


def _add_log_level(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--log-level", choices=list(_LOG_LEVELS), default=default, help=f"log level (default: {default})"
    )


def _addresses(given: list[str] | None) -> list[str]:
    """The --address flags, else those of ``ALMANET_ADDRESSES`` (comma-separated); none: the command's default."""
    if given:
        return given
    return [address.strip() for address in os.environ.get(ADDRESSES_VARIABLE, "").split(",") if address.strip()]


def _above_zero(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number above 0, not {text}")
    return value


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text}")
    return value


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


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """TLS, compression and AUTH of the connections to nsqd (``ConnectionOptions``)."""
    group = parser.add_argument_group("connections to nsqd (default: the code's, for serve)")
    group.add_argument("--tls", action="store_true", default=None, help="TLS, trusting the system's CAs")
    group.add_argument("--tls-ca-file", metavar="FILE", help="TLS, trusting the CAs of this PEM file (implies --tls)")
    group.add_argument("--tls-cert-file", metavar="FILE", help="a client certificate (PEM; implies --tls)")
    group.add_argument("--tls-key-file", metavar="FILE", help="its key, unless it is in --tls-cert-file")
    group.add_argument("--tls-server-hostname", metavar="NAME", help="the name nsqd's certificate must have")
    group.add_argument("--snappy", action="store_true", default=None, help="snappy compression (almanet[snappy])")
    group.add_argument("--deflate", action="store_true", default=None, help="deflate compression")
    group.add_argument("--deflate-level", type=int, metavar="1-9", help="deflate's level (default: 6)")
    group.add_argument(
        "--auth-secret",
        metavar="SECRET",
        help=f"the secret for nsqd's AUTH (default: {AUTH_SECRET_VARIABLE}; the variable keeps it out of ps)",
    )


def _connection_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The connection options the flags give (and ``ALMANET_AUTH_SECRET``); checked: a bad one exits."""
    names = ("tls", "tls_ca_file", "tls_cert_file", "tls_key_file", "tls_server_hostname", "snappy", "deflate")
    options = {name: getattr(args, name) for name in (*names, "deflate_level", "auth_secret")}
    options["auth_secret"] = options["auth_secret"] or os.environ.get(AUTH_SECRET_VARIABLE) or None
    options = {name: value for name, value in options.items() if value is not None}
    try:
        ConnectionOptions(**options)
    except (ValueError, ImportError) as error:
        parser.error(str(error))
    return options


async def _call(
    addresses: list[str], uri: str, payload: Any, timeout: float, options: dict[str, Any] | None = None
) -> int:
    try:
        async with new_session(*addresses, **(options or {})) as session:
            reply = await session.call(uri, payload, timeout=timeout)
    except rpc_error as error:  # its str() begins with its name
        print(error, file=sys.stderr)
        if error.payload is not None:
            print(f"payload: {json.dumps(error.payload, default=repr)}", file=sys.stderr)
        return 1
    except (TimeoutError, ConnectionError, ValueError) as error:
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(json.dumps(reply.payload, default=repr))
    return 0


def _add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One nsqd flag per ``BrokerOptions`` field, with its default.

    A boolean flag alone means true, and takes a value as Go's do (``--snappy=false``).
    """
    defaults = BrokerOptions()
    for field in dataclasses.fields(BrokerOptions):
        default = getattr(defaults, field.name)
        converters: dict[type, Any] = {bool: parse_bool, int: int, float: parse_duration, str: str}
        convert: Any = field.metadata.get("parse") or converters[type(default)]
        optional_value: dict[str, Any] = {"nargs": "?", "const": True} if isinstance(default, bool) else {}
        shown = f"{default:g}s" if isinstance(default, float) else repr(default)
        if isinstance(default, bool):
            shown = str(default).lower()
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            type=convert,
            default=default,
            metavar="<value>",
            help=f"{field.metadata['help']} (default: {shown})",
            **optional_value,
        )
