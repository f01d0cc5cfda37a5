"""README's runnable examples run and print what their comments say."""

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from almanet.pytest_plugin import BrokerAddresses

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
    for name, block in (("microservice.py", service_block), ("caller.py", caller_block)):
        assert "127.0.0.1:4150" in block
        (tmp_path / name).write_text(block.replace("127.0.0.1:4150", almanet_broker.tcp_address))
    service = subprocess.Popen([sys.executable, "microservice.py"], cwd=tmp_path)
    try:
        # The call waits in the procedure's topic until the service subscribes.
        caller = subprocess.run(
            [sys.executable, "caller.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True
        )
    finally:
        service.terminate()
        assert service.wait(timeout=30) == 0
    assert caller.stdout.splitlines() == re.findall(r"#\s*(.+)$", caller_block, re.MULTILINE)
