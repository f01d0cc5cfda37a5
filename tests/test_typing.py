"""Types for users: ``mypy --strict`` passes on a typical application and on README's examples.

mypy reads almanet as an installed package (its own errors are not the
user's: ``--follow-imports=silent``), from this checkout (``MYPYPATH``).
"""

from __future__ import annotations

import importlib.util
import re
import sys
import uuid
from pathlib import Path
from types import ModuleType

import pytest

from almanet.pytest_plugin import BrokerAddresses
from helpers import mypy_strict

PROJECT = Path(__file__).resolve().parent.parent
APP = Path(__file__).resolve().parent / "typing_app" / "app.py"


def load_app() -> ModuleType:
    module = sys.modules.get("typing_app_app")
    if module is None:
        spec = importlib.util.spec_from_file_location("typing_app_app", APP)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["typing_app_app"] = module  # dataclasses resolve their module's annotations
        spec.loader.exec_module(module)
    return module


async def test_the_typical_app_runs(almanet_broker: BrokerAddresses) -> None:
    lines = await load_app().main(almanet_broker.tcp_address, f"test.{uuid.uuid4().hex[:12]}")
    assert lines == [
        "receipt 6 None",
        "total 6",
        "raw 9",
        "shop.OutOfStock {'restock': 'monday'}",
        "multicall 1",
        "order 1 (attempt 1)",
        "order 2 (attempt 1)",
        "order 3 (attempt 1)",
    ]


def readme_blocks() -> dict[str, str]:
    """README's Python blocks by a file name saying where they are: readme_<n>_<section>.py."""
    blocks = {}
    for section in re.split(r"\n(?=## )", (PROJECT / "README.md").read_text()):
        title = re.sub(r"\W+", "_", section.splitlines()[0].removeprefix("## ").lower()).strip("_")
        for block in re.findall(r"```python\n(.*?)```", section, re.DOTALL):
            blocks[f"readme_{len(blocks) + 1:02d}_{title}.py"] = block
    return blocks


def test_mypy_strict_passes_on_the_typical_app_and_the_readme(tmp_path: Path) -> None:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install almanet[lint])")
    files = {"app.py": APP.read_text(), **readme_blocks()}
    assert len(files) > 5
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    checked = mypy_strict(tmp_path, *sorted(files), cache="typing-tests")
    assert checked.returncode == 0, checked.stdout + checked.stderr


WRONG = """\
import almanet
from app import Order, buy


async def wrong(session: almanet.Session) -> None:
    almanet.new_session("127.0.0.1:4150", msg_timout=5.0)
    almanet.new_service("127.0.0.1:4150", prefx="shop")
    almanet.new_session("127.0.0.1:4150", heartbeat_interval="30s")
    text: str = (await session.call(buy, Order("milk"))).payload
    await buy(Order("milk"), session=None)
    await buy("milk", session=session)
"""


def test_mypy_strict_catches_what_users_get_wrong(tmp_path: Path) -> None:
    """The decorator keeps the function's signature, ``Reply`` is generic, the keywords are real parameters."""
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install almanet[lint])")
    (tmp_path / "app.py").write_text(APP.read_text())
    (tmp_path / "wrong.py").write_text(WRONG)
    checked = mypy_strict(tmp_path, "app.py", "wrong.py", cache="typing-tests")
    errors = [line.split(": error: ", 1)[1] for line in checked.stdout.splitlines() if ": error: " in line]
    expected = [
        'Unexpected keyword argument "msg_timout" for "new_session"',
        'Unexpected keyword argument "prefx" for "new_service"',
        'Argument "heartbeat_interval" to "new_session" has incompatible type "str"; expected "float"',
        'Incompatible types in assignment (expression has type "Receipt", variable has type "str")',
        'Argument "session" to "__call__" of "Procedure" has incompatible type "None"; expected "Session"',
        'Argument 1 to "__call__" of "Procedure" has incompatible type "str"; expected "Order"',
    ]
    assert len(errors) == len(expected), checked.stdout
    for error, fragment in zip(errors, expected, strict=True):
        assert fragment in error, checked.stdout
