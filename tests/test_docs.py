"""The documentation cannot rot: every ```python block of README.md and docs/**/*.md runs.

Each markdown file with python blocks is one test case: its blocks run in order, in one shared
namespace (like a doctest session: a later block uses what an earlier one made), in a fresh
temporary working directory, on small data (scikit-learn's ``digits``, which needs no download).
A block that is not meant to run (a signature, an output sample, pseudo-code, a shell command)
must be fenced as ```text, ```bash, ```json, ...; never as ```python.

Besides running the blocks: every markdown file is UTF-8, its fences are closed, no block hides
from this test behind an alias of python (```py, ```python3), and every link stays inside the
repository (a relative link names a file that exists here, an anchor names a heading; no
absolute local paths, nothing under ``../shared``). http(s) links to public sites are allowed.
"""

from __future__ import annotations

import os
import re
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
README = "README.md"

# A block that runs longer than this is doing a full-scale run: the docs must use small data
# (the small runs of the docs take a few seconds each on 2 shared CPU cores).
BLOCK_SECONDS = 60.0

# Info strings GitHub renders as Python but that this test would not run.
_PYTHON_ALIASES = {"py", "py3", "python3", "python2", "pycon", "ipython", "python-repl"}


@dataclass(frozen=True)
class Block:
    info: str
    line: int  # 1-based line of the opening fence
    text: str
    closed: bool


def markdown_files() -> list[str]:
    """README.md and every docs/**/*.md, as paths relative to the repository."""
    files = [README] if (REPO / README).exists() else []
    files += sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").rglob("*.md"))
    return files


def _read(rel: str) -> str:
    return (REPO / rel).read_bytes().decode("utf-8", errors="replace")


_FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})(.*)$")


def fenced_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a markdown text (CommonMark fences: ``` or ~~~, 3 or more,
    indented at most 3 spaces; closed by a fence of the same character at least as long)."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m or (m.group(2)[0] == "`" and "`" in m.group(3)):
            i += 1
            continue
        indent, fence, info = len(m.group(1)), m.group(2), m.group(3).strip()
        start, body, closed = i + 1, [], False
        i += 1
        while i < len(lines):
            close = _FENCE.match(lines[i])
            if close and close.group(2)[0] == fence[0] and len(close.group(2)) >= len(fence) and not close.group(3).strip():
                closed = True
                break
            line = lines[i]
            # content lines lose up to the opening fence's indentation
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))):])
            i += 1
        blocks.append(Block(info, start, "\n".join(body) + ("\n" if body else ""), closed))
        i += 1
    return blocks


def python_blocks(rel: str) -> list[Block]:
    return [b for b in fenced_blocks(_read(rel)) if b.info == "python"]


ALL_FILES = markdown_files()
FILES_WITH_PYTHON = [rel for rel in ALL_FILES if python_blocks(rel)]


def test_collection_finds_the_python_blocks():
    assert README in ALL_FILES, "README.md is missing"
    assert python_blocks(README), "README.md has no ```python block: the collection found nothing to run"
    assert any(rel.startswith("docs/") for rel in ALL_FILES), "no markdown file under docs/"


@pytest.mark.parametrize("rel", ALL_FILES)
def test_markdown_is_utf8_with_well_formed_fences(rel):
    data = (REPO / rel).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        pytest.fail(f"{rel} is not valid UTF-8: {e}", pytrace=False)
    problems = []
    for b in fenced_blocks(text):
        if not b.closed:
            problems.append(f"line {b.line}: the fence ```{b.info} is never closed")
        word = b.info.split()[0].lower() if b.info else ""
        if b.info != "python" and (word in _PYTHON_ALIASES or word == "python" or word.strip("{}.") == "python"):
            problems.append(f"line {b.line}: info string {b.info!r}: use exactly ```python for code that runs "
                            "(it is then executed by tests/test_docs.py) or ```text for code that does not")
    assert not problems, f"{rel}:\n" + "\n".join(problems)


def _run_block(rel: str, block: Block, namespace: dict) -> None:
    if not block.text.strip():
        pytest.fail(f"{rel}, line {block.line}: the ```python block is empty", pytrace=False)
    # Padding with newlines makes tracebacks give the markdown file's own line numbers.
    source = "\n" * block.line + block.text
    started = time.perf_counter()
    try:
        code = compile(source, rel, "exec")
        exec(code, namespace)
    except BaseException as e:  # noqa: BLE001 - SystemExit / KeyboardInterrupt from a block are failures too
        if isinstance(e, KeyboardInterrupt):
            raise
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        numbered = "\n".join(f"{block.line + 1 + k:5d} | {line}" for k, line in enumerate(block.text.splitlines()))
        pytest.fail(f"{rel}: the ```python block starting at line {block.line} raised "
                    f"{type(e).__name__}: {e}\n\n{numbered}\n\n{tb}", pytrace=False)
    seconds = time.perf_counter() - started
    if seconds > BLOCK_SECONDS:
        pytest.fail(f"{rel}: the ```python block starting at line {block.line} took {seconds:.0f} s (limit "
                    f"{BLOCK_SECONDS:.0f} s): use small data in the docs and give the full-scale values in prose",
                    pytrace=False)


@pytest.mark.parametrize("rel", FILES_WITH_PYTHON)
def test_python_blocks_run(rel, tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace = {"__name__": "__main__", "__file__": str(REPO / rel)}
    # The blocks seed torch; leave the rest of the test session's random state as it was.
    with torch.random.fork_rng(devices=[]):
        for block in python_blocks(rel):
            _run_block(rel, block, namespace)


# ------------------------------------------------------------------------------------------------
# Links

_INLINE_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*)?\)")
_REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
_HTML_LINK = re.compile(r"""<(?:a|img|source)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)


def _prose(text: str) -> str:
    """The text with fenced blocks and inline code blanked out (their contents are not links)."""
    lines = text.splitlines()
    for b in fenced_blocks(text):
        end = b.line + b.text.count("\n") + 1
        for k in range(b.line - 1, min(end, len(lines))):
            lines[k] = ""
    return _INLINE_CODE.sub(" ", "\n".join(lines))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    heading = heading.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = _prose_keep_headings(text)
    seen: dict[str, int] = {}
    anchors = set()
    for line in lines:
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    anchors |= set(re.findall(r"""<a\s+(?:name|id)\s*=\s*["']([^"']+)["']""", text))
    return anchors


def _prose_keep_headings(text: str) -> list[str]:
    lines = text.splitlines()
    for b in fenced_blocks(text):
        end = b.line + b.text.count("\n") + 1
        for k in range(b.line - 1, min(end, len(lines))):
            lines[k] = ""
    return lines


def links(text: str) -> list[str]:
    prose = _prose(text)
    return [m.group(1) for pattern in (_INLINE_LINK, _REFERENCE_DEF, _HTML_LINK) for m in pattern.finditer(prose)]


def link_problem(rel: str, target: str) -> str | None:
    """Why ``target`` (a link in the file ``rel``) points outside the repository, or None."""
    if not target:
        return "an empty link"
    if re.match(r"^https?://", target, re.IGNORECASE):
        return None
    if re.match(r"^mailto:", target, re.IGNORECASE):
        return None
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
        return "a link with a non-web scheme (file:, a local path, ...)"
    path_part, _, anchor = target.partition("#")
    path_part = unquote(path_part.split("?")[0])
    if path_part.startswith(("/", "~", "\\")):
        return "an absolute local path"
    if "shared" in Path(path_part).parts and ".." in Path(path_part).parts:
        return "a path into ../shared, outside the repository"
    source = REPO / rel
    resolved = (source.parent / path_part).resolve() if path_part else source.resolve()
    try:
        resolved.relative_to(REPO)
    except ValueError:
        return "a path outside the repository"
    if not resolved.exists():
        return f"no such file in the repository ({resolved.relative_to(REPO).as_posix()})"
    if anchor and resolved.is_file() and resolved.suffix == ".md" and anchor.lower() not in _anchors(resolved):
        return f"no heading with the anchor #{anchor} in {resolved.relative_to(REPO).as_posix()}"
    return None


@pytest.mark.parametrize("rel", ALL_FILES)
def test_links_stay_inside_the_repository(rel):
    text = _read(rel)
    problems = [f"({target}): {why}" for target in links(text) if (why := link_problem(rel, target))]
    if "../shared" in text:
        problems.append("mentions ../shared: the docs must not point outside the repository")
    assert not problems, f"{rel}:\n" + "\n".join(problems)


def test_link_checker_catches_what_it_should():
    # the checker itself: these must be refused, those accepted
    rel = "docs/tracking.md"
    assert link_problem(rel, "../shared/notes.md")
    assert link_problem(rel, "/work/main/README.md")
    assert link_problem(rel, "file:///etc/passwd")
    assert link_problem(rel, "no-such-page.md")
    assert link_problem(rel, "../../outside.md")
    assert link_problem(rel, "#no-such-heading")
    assert link_problem(rel, "method.md") is None
    assert link_problem(rel, "https://arxiv.org/abs/2603.10234") is None
    assert link_problem(rel, "#every-default-in-one-table") is None
    assert links("see [a](x.md), ![b](img.png \"t\"), `[c](y.md)`\n\n```\n[d](z.md)\n```\n[e]: w.md\n") == \
        ["x.md", "img.png", "w.md"]
    blocks = fenced_blocks("a\n```python\nx = 1\n```\n~~~text\n```\n~~~\n```python\n")
    assert [(b.info, b.line, b.text, b.closed) for b in blocks] == [
        ("python", 2, "x = 1\n", True), ("text", 5, "```\n", True), ("python", 8, "", False)]
    assert os.path.isdir(REPO / "docs")
