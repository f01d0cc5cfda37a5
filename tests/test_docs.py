"""README.md and the pages of docs/: every Python block runs, and every relative link leads somewhere.

A ``python`` block runs as it stands, and prints what its ``# ...`` comments
say, unless its section is named below with the test that runs it otherwise:
the quick start as a service and a caller, each in a process of its own, on
the test's broker instead of 127.0.0.1:4150; the testing example is the test
file the suite runs; the TLS example beside certificates it loads; the
cluster page by tests/test_cluster.py on a cluster. A fragment that is not
meant to run is a ``text`` block. mkdocs (``make docs``, strict) checks the
links within docs/ too; these tests check README's as well, without mkdocs.
"""

import contextlib
import dataclasses
import datetime
import importlib.util
import io
import re
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import pytest

import almanet
from almanet.pytest_plugin import BrokerAddresses
from helpers import mypy_strict, wait_until_served

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
USER_TESTING = Path(__file__).resolve().parent / "test_user_testing.py"


@dataclasses.dataclass(frozen=True)
class Block:
    """A fenced code block of a page: the heading above it, its language and its code."""

    page: str  # relative to the repository: README.md, docs/RPC.md
    section: str
    line: int
    language: str
    code: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def read_page(path: Path) -> tuple[list[str], list[Block]]:
    """The headings of a page (outside code blocks) and its fenced code blocks."""
    headings: list[str] = []
    blocks: list[Block] = []
    page = str(path.relative_to(ROOT))
    fence: tuple[int, str, list[str]] | None = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if fence is None:
            if line.startswith("```"):
                fence = (number, (line[3:].split() or [""])[0], [])  # ```python title="x": python
            elif heading := re.match(r"#{1,6} (.+)$", line):
                headings.append(heading.group(1).strip())
        elif line.startswith("```"):
            start, language, code = fence
            blocks.append(Block(page, headings[-1], start, language, "".join(f"{c}\n" for c in code)))
            fence = None
        else:
            fence[2].append(line)
    assert fence is None, f"{page}:{fence[0]}: a code block that is never closed"
    return headings, blocks


BLOCKS = [block for path in PAGES for block in read_page(path)[1]]
PYTHON = [block for block in BLOCKS if block.language == "python"]

# The sections whose python blocks do not run as they stand, by (page, heading), each with the test
# that runs them. Every other python block is run by test_the_block_runs_and_prints_what_it_says.
SERVICE_AND_CALLER = {("README.md", "Quick start"), ("docs/index.md", "Quick start")}
THE_TEST_FILE = {("README.md", "Testing"), ("docs/TESTING.md", "Testing")}
WITH_CERTIFICATES = {("docs/SECURITY.md", "TLS, AUTH and compression")}
RUN_ELSEWHERE = {
    ("docs/CLUSTER.md", "Three nodes on one machine"): "tests/test_cluster.py::test_the_cluster_page_runs_as_written",
    ("docs/OBSERVABILITY.md", "In code: an example exporting to the console"): (
        "tests/test_otel.py::test_the_observability_page_runs_as_written"
    ),
}
NOT_AS_THEY_STAND = SERVICE_AND_CALLER | THE_TEST_FILE | WITH_CERTIFICATES | RUN_ELSEWHERE.keys()


def in_sections(sections: set[tuple[str, str]]) -> list[Block]:
    return [block for block in PYTHON if (block.page, block.section) in sections]


AS_THEY_STAND = [block for block in PYTHON if (block.page, block.section) not in NOT_AS_THEY_STAND]


def printed_by_comments(code: str) -> list[str]:
    """What a block says it prints: its ``# ...`` comments, in order."""
    return re.findall(r"(?:^|\s)#\s*(.+)$", code, re.MULTILINE)


def execute(block: Block) -> list[str]:
    """Run ``block`` in a namespace of its own; the lines it printed."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(block.code, str(ROOT / block.page), "exec", dont_inherit=True), {"__name__": "docs_example"})
    return output.getvalue().splitlines()


# --- every python block runs ------------------------------------------------------------------


def test_every_python_block_is_run_by_a_test() -> None:
    """A python block added anywhere is run by one of the tests below, or by the test named for its section."""
    run = (
        AS_THEY_STAND
        + in_sections(SERVICE_AND_CALLER)
        + in_sections(THE_TEST_FILE)
        + in_sections(WITH_CERTIFICATES)
        + in_sections(set(RUN_ELSEWHERE))
    )
    assert sorted(map(str, run)) == sorted(map(str, PYTHON))
    assert len(PYTHON) == len(set(map(str, PYTHON)))
    sections = {(block.page, block.section) for block in PYTHON}
    assert sorted(NOT_AS_THEY_STAND - sections) == [], "a section named above has no python block (renamed?)"
    for test in RUN_ELSEWHERE.values():
        path, name = test.split("::")
        assert f"\ndef {name}(" in (ROOT / path).read_text(), f"{test} is gone"


def test_code_blocks_are_fenced_at_the_margin_and_python_is_spelt_python() -> None:
    """An indented fence, or ``py``/``python3``, would hide a block from these tests."""
    for path in PAGES:
        text = path.read_text()
        assert not re.search(r"^[ \t]+```", text, re.MULTILINE), f"{path.name}: an indented code fence"
    languages = {block.language for block in BLOCKS}
    assert not languages & {"py", "python3", "pycon", "Python"}, languages
    assert AS_THEY_STAND, "no block found: is the parser broken?"


@pytest.mark.parametrize("block", AS_THEY_STAND, ids=str)
def test_the_block_runs_and_prints_what_it_says(block: Block) -> None:
    assert execute(block) == printed_by_comments(block.code)


@pytest.mark.parametrize("page", sorted({page for page, _ in SERVICE_AND_CALLER}))
def test_the_quick_start_runs_as_written(page: str, almanet_broker: BrokerAddresses, tmp_path: Path) -> None:
    """The service and the caller, each in a process, on the test's broker instead of 127.0.0.1:4150."""
    service_block, caller_block = in_sections({(page, "Quick start")})
    for block in (service_block, caller_block):
        assert "127.0.0.1:4150" in block.code
    printed = run_service_and_caller(
        almanet_broker,
        tmp_path,
        service_block.code.replace("127.0.0.1:4150", almanet_broker.tcp_address),
        caller_block.code.replace("127.0.0.1:4150", almanet_broker.tcp_address),
    )
    assert printed == printed_by_comments(caller_block.code)


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


@pytest.mark.parametrize("section", sorted(THE_TEST_FILE), ids="#".join)
def test_the_testing_example_is_the_test_file_the_suite_runs(section: tuple[str, str]) -> None:
    """The Testing example, word for word, is tests/test_user_testing.py (run with the rest)."""
    (block,) = in_sections({section})
    assert block.code == USER_TESTING.read_text()


@pytest.mark.parametrize("page", sorted({page for page, _ in THE_TEST_FILE}))
def test_the_testing_example_runs_in_a_project_of_its_own_without_a_warning(page: str, tmp_path: Path) -> None:
    """As a user sets it up: the page's pyproject.toml block, the test file, pytest with warnings as errors."""
    (toml,) = [block for block in BLOCKS if block.page == page and block.language == "toml"]
    (tmp_path / "pyproject.toml").write_text(toml.code)
    (tmp_path / "test_app.py").write_text(USER_TESTING.read_text())
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error", "test_app.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Warning" not in done.stdout + done.stderr


@pytest.mark.parametrize("block", in_sections(WITH_CERTIFICATES), ids=str)
def test_the_tls_example_loads_its_certificates(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ca.pem, client.pem and client.key in the current directory, the secret in the environment: it loads them.

    Files that do not load are a ValueError at new_session and new_service; nothing connects yet.
    """
    write_certificate(tmp_path / "client.pem", tmp_path / "client.key")
    (tmp_path / "ca.pem").write_bytes((tmp_path / "client.pem").read_bytes())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALMANET_AUTH_SECRET", "a secret")
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile(block.code, str(ROOT / block.page), "exec", dont_inherit=True), namespace)
    assert isinstance(namespace["service"], almanet.Service)
    assert isinstance(namespace["session"], almanet.Session)
    (tmp_path / "client.key").write_text("not a key")
    with pytest.raises(ValueError):
        exec(compile(block.code, str(ROOT / block.page), "exec", dont_inherit=True), {"__name__": "docs_example"})


def write_certificate(certificate: Path, key: Path) -> None:
    """A self-signed certificate and its key, in PEM: a CA file and a client certificate alike."""
    x509 = pytest.importorskip("cryptography.x509")
    hashes = pytest.importorskip("cryptography.hazmat.primitives.hashes")
    serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")
    ec = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.ec")
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "docs")])
    now = datetime.datetime.now(datetime.timezone.utc)
    issued = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    certificate.write_bytes(issued.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def test_mypy_strict_passes_on_the_pages_blocks(tmp_path: Path) -> None:
    """As tests/test_typing.py checks README's: each python block of docs/ a module of its own."""
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install almanet[lint])")
    files = {}
    for number, block in enumerate(PYTHON, 1):
        if block.page != "README.md":
            stem = re.sub(r"\W+", "_", f"{block.page.removeprefix('docs/').removesuffix('.md')}_{block.section}")
            files[f"docs_{number:02d}_{stem.lower().strip('_')}.py"] = block.code
    for name, code in files.items():
        (tmp_path / name).write_text(code)
    checked = mypy_strict(tmp_path, *sorted(files), cache="docs-tests")
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- no link is broken --------------------------------------------------------------------------


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def mkdocs_slug(heading: str) -> str:
    """The anchor mkdocs gives a heading (Python-Markdown's toc): ASCII, no punctuation, runs of - and space one -."""
    text = re.sub(r"(`+)(.+?)\1", r"\2", heading)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def links(path: Path) -> list[str]:
    """The targets of a page's inline links and images, outside code blocks and code spans."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    text = re.sub(r"(`+)(.+?)\1", "", text, flags=re.DOTALL)
    return re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)


def test_the_slugs_are_githubs_and_mkdocs() -> None:
    assert "docs/RPC.md#command-line" in links(README), "is the link pattern broken?"
    assert github_slug("TLS, AUTH and compression") == mkdocs_slug("TLS, AUTH and compression")
    assert github_slug("1. NSQ basics") == "1-nsq-basics" == mkdocs_slug("1. NSQ basics")
    assert github_slug("Typed procedures and `describe`") == "typed-procedures-and-describe"
    assert mkdocs_slug("Typed procedures and `describe`") == "typed-procedures-and-describe"
    assert github_slug("Produce & consume") == "produce--consume" != mkdocs_slug("Produce & consume")


@pytest.mark.parametrize("path", PAGES, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_relative_link_is_broken(path: Path) -> None:
    """Each relative link names a file that exists, and a heading it has, as both GitHub and mkdocs slug it."""
    broken = []
    for link in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        resolved = (path.parent / target).resolve() if target else path
        if not resolved.exists():
            broken.append(f"{link}: no such file")
            continue
        if path.parent == DOCS and DOCS not in resolved.parents:
            broken.append(f"{link}: outside docs/, which the site cannot link to (link to GitHub)")
        if anchor:
            headings = read_page(resolved)[0] if resolved.suffix == ".md" else []
            if anchor not in {github_slug(h) for h in headings}:
                broken.append(f"{link}: GitHub gives no heading of {resolved.name} that anchor")
            if anchor not in {mkdocs_slug(h) for h in headings}:
                broken.append(f"{link}: mkdocs gives no heading of {resolved.name} that anchor")
    assert broken == []


def test_every_page_is_in_the_nav_and_the_readme_links_to_each() -> None:
    """mkdocs.yml lists every page of docs/ (and only those); README links to each, as docs/PAGE.md."""
    nav = re.findall(r"^\s+- (?:[^:\n]+: )?(\S+\.md)$", (ROOT / "mkdocs.yml").read_text(), re.MULTILINE)
    pages = sorted(path.name for path in DOCS.glob("*.md"))
    assert sorted(nav) == pages
    linked = {link.partition("#")[0] for link in links(README)}
    assert sorted(page for page in pages if f"docs/{page}" not in linked) == []
