"""README's runnable examples run and print what their comments say."""

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(section: str) -> list[str]:
    text = README.read_text()
    body = text.split(section, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.DOTALL)


@pytest.mark.parametrize("section", ["## The frame codec", "## The embedded broker", "## The NSQ client"])
def test_example_runs_and_prints_what_it_says(section: str) -> None:
    (block,) = python_blocks(section)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(block, str(README), "exec"), {})
    expected = re.findall(r"#\s*(.+)$", block, re.MULTILINE)
    assert output.getvalue().splitlines() == expected
