"""The ``almanet`` command: addresses, what ``call`` prints, help, version, refused flags.

``serve`` and ``call`` run as processes of their own against the shared
broker; what only parses arguments runs ``main`` here.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

import almanet
from almanet.broker import BrokerOptions
from almanet.cli import main
from almanet.pytest_plugin import BrokerAddresses
from helpers import broker_of_kind, free_port

TIMEOUT = 30.0
NOWHERE = "127.0.0.1:1"  # nothing listens there: the addresses the command line gives must win

APP = """\
import almanet

service = almanet.new_service({address!r}, prefix={prefix!r})


class OutOfStock(almanet.rpc_error):
    name = "shop.OutOfStock"


@service.procedure
async def buy(payload: dict) -> int:
    if payload["item"] == "tea":
        raise OutOfStock("tea", payload={{"restock": "monday"}})
    return payload["count"] * 3


if __name__ == "__main__":
    service.serve()
"""


def write_app(directory: Path, address: str = NOWHERE) -> str:
    """An application module ``app`` in ``directory``, whose service has a prefix of its own; the prefix."""
    prefix = f"test.{uuid.uuid4().hex[:12]}"
    (directory / "app.py").write_text(APP.format(address=address, prefix=prefix))
    return prefix


def environment(**variables: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name != "ALMANET_ADDRESSES"}
    return {**env, "PYTHONUNBUFFERED": "1", **variables}


class Running:
    """A process whose stderr is read line by line as it comes."""

    def __init__(self, command: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put(line)

    def wait_for(self, text: str) -> str:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r} in {TIMEOUT} s: {''.join(self.seen)}") from None
            self.seen.append(line)
            if text in line:
                return line

    def stop(self) -> str:
        """SIGTERM; everything it wrote to stderr."""
        self.process.terminate()
        assert self.process.wait(TIMEOUT) == 0, "".join(self.seen)
        time.sleep(0.1)  # the reader thread takes the last lines
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return "".join(self.seen)


def serve(directory: Path, *flags: str, env: dict[str, str]) -> Running:
    return Running([sys.executable, "-m", "almanet", "serve", "app:service", *flags], directory, env)


def call(uri: str, payload: str, *flags: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "almanet", "call", uri, payload, *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


# --- serve and call on the addresses the command line gives ----------------------------------


def test_serve_and_call_take_address_flags_and_print_errors_once(
    almanet_broker: BrokerAddresses, tmp_path: Path
) -> None:
    address = almanet_broker.tcp_address
    prefix = write_app(tmp_path)
    service = serve(tmp_path, "--address", address, "--log-level", "debug", env=environment())
    try:
        service.wait_for(f"serving {prefix}.buy (channel rpc) on {address}")
        bought = call(f"{prefix}.buy", '{"item": "milk", "count": 2}', "--address", address, env=environment())
        assert (bought.returncode, bought.stdout, bought.stderr) == (0, "6\n", "")

        refused = call(f"{prefix}.buy", '{"item": "tea", "count": 1}', "--address", address, env=environment())
        assert refused.returncode == 1
        assert refused.stderr == 'shop.OutOfStock: tea\npayload: {"restock": "monday"}\n'

        failed = call(f"{prefix}.buy", '{"item": "milk"}', "--address", address, env=environment())
        assert (failed.returncode, failed.stderr) == (1, "InternalError: KeyError: 'count'\n")
    finally:
        logged = service.stop()
    # At DEBUG, each call: its URI, its time and its outcome.
    for outcome in ("ok", "shop.OutOfStock", "InternalError"):
        assert f"{prefix}.buy: {outcome} in " in logged, logged
    assert f"{prefix}.buy raised" in logged  # the error log names the procedure


def test_serve_and_call_take_almanet_addresses_from_the_environment(
    almanet_broker: BrokerAddresses, tmp_path: Path
) -> None:
    address = almanet_broker.tcp_address
    prefix = write_app(tmp_path)
    env = environment(ALMANET_ADDRESSES=f" {address} , ")
    service = serve(tmp_path, env=env)
    try:
        service.wait_for(f"serving {prefix}.buy (channel rpc) on {address}")
        bought = call(f"{prefix}.buy", '{"item": "milk", "count": 1}', env=env)
        assert (bought.returncode, bought.stdout) == (0, "3\n"), bought.stderr
        # --address wins over the environment.
        elsewhere = call(f"{prefix}.buy", '{"item": "milk", "count": 1}', "--address", NOWHERE, env=env)
        assert elsewhere.returncode == 1
        assert f"ConnectionFailed: no nsqd reachable: cannot connect to nsqd at {NOWHERE}" in elsewhere.stderr
    finally:
        logged = service.stop()
    assert ": ok in " not in logged  # calls are logged at DEBUG only


def test_python_app_py_logs_what_it_serves(almanet_broker: BrokerAddresses, tmp_path: Path) -> None:
    """``service.serve()`` in an application that set up no logging: to stderr, at INFO."""
    address = almanet_broker.tcp_address
    prefix = write_app(tmp_path, address)
    service = Running([sys.executable, "app.py"], tmp_path, environment())
    try:
        line = service.wait_for(f"serving {prefix}.buy (channel rpc) on {address}")
        assert "INFO" in line
    finally:
        service.stop()


@pytest.mark.parametrize("kind", ["embedded", "nsqd"])
def test_serve_started_before_its_nsqd_waits_for_it_and_call_fails_fast(kind: str, tmp_path: Path) -> None:
    """As compose or systemd may start a service before nsqd: said once, then it serves within 3 s of nsqd."""
    address = f"127.0.0.1:{free_port()}"
    prefix = write_app(tmp_path)
    service = serve(tmp_path, "--address", address, env=environment())
    try:
        said = service.wait_for("waiting for nsqd")
        assert f"cannot connect to nsqd at {address}" in said and "trying every 1 s" in said
        started = time.monotonic()
        failed = call(f"{prefix}.buy", '{"item": "milk", "count": 1}', "--address", address, env=environment())
        assert failed.returncode == 1 and "ConnectionFailed" in failed.stderr
        assert time.monotonic() - started < 5.0
        time.sleep(1.5)
        with broker_of_kind(kind, address):
            started = time.monotonic()
            service.wait_for(f"serving {prefix}.buy")
            assert time.monotonic() - started < 3.0
            bought = call(f"{prefix}.buy", '{"item": "milk", "count": 2}', "--address", address, env=environment())
            assert (bought.returncode, bought.stdout) == (0, "6\n"), bought.stderr
            logged = service.stop()
    finally:
        if service.process.poll() is None:
            service.process.kill()
    assert logged.count("waiting for nsqd") == 1, logged  # once at start: the next would come 10 s later
    assert "Traceback" not in logged


def test_serve_waiting_for_nsqd_stops_at_once_on_sigterm(tmp_path: Path) -> None:
    write_app(tmp_path)
    service = serve(tmp_path, "--address", f"127.0.0.1:{free_port()}", env=environment())
    service.wait_for("waiting for nsqd")
    started = time.monotonic()
    logged = service.stop()
    assert time.monotonic() - started < 5.0 and "Traceback" not in logged


def test_serve_refuses_an_address_without_a_port(tmp_path: Path) -> None:
    write_app(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "almanet", "serve", "app:service", "--address", "localhost"],
        cwd=tmp_path,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 2
    assert "address 'localhost' has no port: write host:port, e.g. 127.0.0.1:4150" in done.stderr


# --- what only parses arguments -------------------------------------------------------------


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``almanet ARGV`` here: its exit code, stdout and stderr."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    code = exited.value.code
    captured = capsys.readouterr()
    return (code if isinstance(code, int) else 1), captured.out, captured.err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(capsys, "--version") == (0, f"almanet {almanet.__version__}\n", "")


@pytest.mark.parametrize("command", [[], ["broker"], ["serve"], ["call"], ["describe"], ["bench"]])
def test_help_is_plain_text(capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    """No reST double backticks (``name``) in what --help prints."""
    code, output, _ = run_main(capsys, *command, "--help")
    assert code == 0
    assert "usage: almanet" in output
    assert "``" not in output


def test_serve_and_call_help_name_the_environment_variable(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("serve", "call"):
        _, output, _ = run_main(capsys, command, "--help")
        assert "--address" in output and "ALMANET_ADDRESSES" in output


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--scale", "0"], "argument --scale: must be a number above 0, not 0"),
        (["--scale", "-1"], "argument --scale: must be a number above 0, not -1"),
        (["--scale", "nan"], "argument --scale: must be a number above 0, not nan"),
        (["--scale", "big"], "argument --scale: must be a number above 0, not big"),
        (["--rounds", "0"], "argument --rounds: must be a whole number of at least 1, not 0"),
        (["--rounds", "1.5"], "argument --rounds: must be a whole number of at least 1, not 1.5"),
    ],
)
def test_bench_refuses_what_would_measure_nothing(
    capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    code, _, errors = run_main(capsys, "bench", *flags)
    assert code == 2
    assert f"almanet bench: error: {message}" in errors


def test_the_broker_listens_on_loopback_unless_told(capsys: pytest.CaptureFixture[str]) -> None:
    defaults = BrokerOptions()
    assert (defaults.tcp_address, defaults.http_address) == ("127.0.0.1:4150", "127.0.0.1:4151")
    _, output, _ = run_main(capsys, "broker", "--help")
    flattened = " ".join(output.split())
    assert "(0.0.0.0:4150: on every interface) (default: '127.0.0.1:4150')" in flattened
    assert "(0.0.0.0:4151: on every interface) (default: '127.0.0.1:4151')" in flattened


def test_bench_is_not_offered_where_its_harness_is_not_installed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wheel leaves almanet.bench out: ``almanet --help`` there does not name it."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "almanet.bench" else find_spec(name))
    code, out, _ = run_main(capsys, "--help")
    assert code == 0 and "bench" not in out and "serve" in out
    code, _, errors = run_main(capsys, "bench")
    assert code == 2 and "invalid choice: 'bench'" in errors


SLOW_APP = """\
import asyncio

import almanet

service = almanet.new_service("127.0.0.1:1", prefix={prefix!r})


@service.procedure
async def slow(payload: float) -> float:
    await asyncio.sleep(payload)
    return payload
"""


def test_a_second_sigint_stops_serve_at_once_without_a_traceback(
    almanet_broker: BrokerAddresses, tmp_path: Path
) -> None:
    prefix = f"test.{uuid.uuid4().hex[:12]}"
    (tmp_path / "app.py").write_text(SLOW_APP.format(prefix=prefix))
    address = almanet_broker.tcp_address
    service = serve(tmp_path, "--address", address, env=environment())
    try:
        service.wait_for(f"serving {prefix}.slow")
        calling = subprocess.Popen(
            [sys.executable, "-m", "almanet", "call", f"{prefix}.slow", "30", "--address", address, "--timeout", "60"],
            env=environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # the call runs in the service
        service.process.send_signal(signal.SIGINT)
        service.wait_for("stopping")
        started = time.monotonic()
        service.process.send_signal(signal.SIGINT)
        assert service.process.wait(TIMEOUT) == 0
        assert time.monotonic() - started < 3.0
        calling.kill()
        calling.wait()
    finally:
        if service.process.poll() is None:
            service.process.kill()
    time.sleep(0.1)
    while not service.lines.empty():
        service.seen.append(service.lines.get())
    logged = "".join(service.seen)
    assert "stopped at once" in logged and "Traceback" not in logged, logged
