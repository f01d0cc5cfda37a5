"""The README almanet grew from (tests/seed-README.md) runs as written.

README.md and docs/ are tests/test_docs.py's: every python block there runs.
"""

import re
import textwrap
from pathlib import Path

import pytest
from test_docs import run_service_and_caller

from almanet.pytest_plugin import BrokerAddresses

SEED_README = Path(__file__).resolve().parent / "seed-README.md"
SHARED_SEED_README = Path(__file__).resolve().parents[2] / "shared" / "seed" / "almanet-README.md"


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
