"""README's runnable examples run and print what their comments say."""

import contextlib
import io
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from almanet.pytest_plugin import BrokerAddresses
from helpers import wait_until_served

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(section: str) -> list[str]:
    text = README.read_text()
    body = text.split(section, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.DOTALL)


@pytest.mark.parametrize(
    "section", ["## Sessions and services", "## The frame codec", "## The embedded broker", "## The NSQ client"]
)
def test_example_runs_and_prints_what_it_says(section: str) -> None:
    (block,) = python_blocks(section)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(block, str(README), "exec"), {})
    expected = re.findall(r"#\s*(.+)$", block, re.MULTILINE)
    assert output.getvalue().splitlines() == expected


def test_quick_start_runs_as_written(almanet_broker: BrokerAddresses, tmp_path: Path) -> None:
    """The service and the caller, each in a process, on the test's broker instead of 127.0.0.1:4150."""
    service_block, caller_block = python_blocks("## Quick start")
    for block in (service_block, caller_block):
        assert "127.0.0.1:4150" in block
    printed = run_service_and_caller(
        almanet_broker,
        tmp_path,
        service_block.replace("127.0.0.1:4150", almanet_broker.tcp_address),
        caller_block.replace("127.0.0.1:4150", almanet_broker.tcp_address),
    )
    assert printed == re.findall(r"#\s*(.+)$", caller_block, re.MULTILINE)


def run_service_and_caller(broker: BrokerAddresses, directory: Path, service: str, caller: str) -> list[str]:
    """Run the ``service`` script until the ``caller`` script is done, each in a process; what the caller printed.

    The caller starts once the service serves, as a user runs one, then the
    other: a call to a URI nothing serves yet fails at once (NoResponders).
    """
    (directory / "service.py").write_text(service)
    (directory / "caller.py").write_text(caller)
    process = subprocess.Popen([sys.executable, "service.py"], cwd=directory)
    try:
        wait_until_served(broker.tcp_address, "net.example.greeting")
        called = subprocess.run(
            [sys.executable, "caller.py"], cwd=directory, capture_output=True, text=True, timeout=60, check=True
        )
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
    return called.stdout.splitlines()


SEED_README = Path(__file__).resolve().parent / "seed-README.md"
SHARED_SEED_README = Path(__file__).resolve().parents[2] / "shared" / "seed" / "almanet-README.md"


def test_the_testing_example_runs_in_a_project_of_its_own_without_a_warning(tmp_path: Path) -> None:
    """As a user sets it up: the README's pyproject.toml block, the test file, pytest with warnings as errors."""
    body = README.read_text().split("## Testing", 1)[1].split("\n## ", 1)[0]
    (toml,) = re.findall(r"```toml\n(.*?)```", body, re.DOTALL)
    (tmp_path / "pyproject.toml").write_text(toml)
    (tmp_path / "test_app.py").write_text((Path(__file__).resolve().parent / "test_user_testing.py").read_text())
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error", "test_app.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Warning" not in done.stdout + done.stderr


def test_the_testing_example_is_the_test_file_the_suite_runs() -> None:
    """README's Testing example, word for word, is tests/test_user_testing.py (run with the rest)."""
    (block,) = python_blocks("## Testing")
    assert block == (Path(__file__).resolve().parent / "test_user_testing.py").read_text()


def test_the_seed_readme_is_the_one_in_shared() -> None:
    """tests/seed-README.md is a copy of the README almanet grew from (in ../shared/seed where it is laid)."""
    if not SHARED_SEED_README.exists():
        pytest.skip(f"{SHARED_SEED_README} is not here")
    assert SEED_README.read_text() == SHARED_SEED_README.read_text()


def test_the_seed_readme_runs_as_written(almanet_broker: BrokerAddresses, tmp_path: Path) -> None:
    """The seed README's snippets, verbatim: its service in one process; its session, entered twice, in another."""
    blocks = re.findall(r"```python\n(.*?)```", SEED_README.read_text(), re.DOTALL)
    importing, new_service, exception, procedure, main, new_session, call, catch = blocks
    address = repr(almanet_broker.tcp_address)
    service = importing + new_service + exception + procedure + main
    caller = "\n".join(
        [
            "import asyncio",
            importing + new_session,
            "async def main():",
            textwrap.indent(call + catch, "    "),
            "asyncio.run(main())",
        ]
    )
    printed = run_service_and_caller(
        almanet_broker,
        tmp_path,
        service.replace("<your nsqd tcp addresses>", address),
        caller.replace("<your nsqd tcp addresses>", address),
    )
    assert printed == ["Hello, Aidar!", 'during call net.example.greeting("guest"): denied']
