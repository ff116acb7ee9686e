"""The README and docs/*.md name only what exists.

- Every command in their shell code blocks (and every inline code span that starts with a command) uses
  options that command accepts: sharnn-train/-eval/-export/-generate/-import/-prepare (with its
  subcommands), `python -m MODULE` (train, bench.*, ...), `accelerate launch [opts] -m MODULE`, the launch
  scripts (their arguments go to `-m train`) and `make TARGET`. An option is checked against the command's
  own `--help` output, run once per command (in this process, through its entry point); the hyphenated
  spellings the commands accept (`--mem-len` for `--mem_len`) count as the underscore one.
- Files named under launch/ and scripts/ exist.
- Python code blocks parse.
- Relative links resolve to files of the repository, and `#anchors` to headings of the page they point to.

Fails listing every problem found, page and line."""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}


@dataclass(frozen=True)
class Snippet:
    page: Path
    line: int  # 1-based, in the page
    text: str
    kind: str  # "shell", "python" or "inline"

    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


# ------------------------------------------------------------------------------------------ reading pages
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")


def split_page(page: Path) -> tuple[list[Snippet], list[tuple[int, str]]]:
    """The page's fenced code blocks (as Snippets) and its prose lines (line number, text) outside them."""
    blocks, prose = [], []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        fence, lang, start = m.group(2), m.group(3).lower(), i + 1
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        kind = "shell" if lang in SHELL else "python" if lang in ("python", "py") else "other"
        blocks.append(Snippet(page, start + 1, "\n".join(body), kind))
    return blocks, prose


def inline_code(prose: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Inline code spans of the prose lines (single backticks; a span does not cross lines here)."""
    return [(n, m.group(1)) for n, text in prose for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text)]


def all_snippets() -> list[Snippet]:
    found = []
    for page in PAGES:
        blocks, prose = split_page(page)
        found += blocks
        found += [Snippet(page, n, span, "inline") for n, span in inline_code(prose)]
    return found


# ---------------------------------------------------------------------------------- commands in shell text
def shell_commands(text: str) -> list[tuple[int, list[str]]]:
    """(line offset, words) of each simple command in a shell snippet: continuation lines joined, comments
    dropped, split at pipes, `;`, `&&`, `||`, redirections and parentheses (what follows a redirection is its
    file, not an argument)."""
    commands = []
    logical, offset = "", 0
    for n, line in enumerate(text.split("\n")):
        if not logical:
            offset = n
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        lexer = shlex.shlex(logical, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        try:
            words = list(lexer)
        except ValueError:  # unbalanced quotes: not shell (e.g. an output line)
            words = []
        current: list[str] = []
        for word in words:
            if word and set(word) <= set("|&;<>()"):
                if current:
                    commands.append((offset, current))
                current = [] if not set(word) & set("<>") else None
            elif current is not None:
                current.append(word)
            else:  # the file of a redirection; later words belong to no command
                current = None
        if current:
            commands.append((offset, current))
        logical = ""
    return commands
"""A subcommand left open (a placeholder in the text): the options of any subcommand."""


# ------------------------------------------------------------------------------------------------ tests
def test_pages_are_found():
    names = {p.name for p in PAGES}
    assert "README.md" in names and len(PAGES) > 1, names
"""An inline code span that is a command line (`sharnn-eval runs/tiny --streams 4`, `NGPU=8 launch/...`)."""


def test_python_blocks_parse():
    problems = []
    for snippet in all_snippets():
        if snippet.kind == "python":
            try:
                ast.parse(snippet.text)
            except SyntaxError as e:
                line = snippet.line + (e.lineno or 1) - 1
                problems.append(f"{snippet.page.relative_to(REPO)}:{line}: {e.msg}")
    assert not problems, "\n".join(problems)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.cache
def anchors(page: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, line in split_page(page)[1]:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def test_relative_links_resolve():
    problems = []
    for page in PAGES:
        for n, line in split_page(page)[1]:
            line = re.sub(r"`[^`]*`", "", line)  # links inside code spans are not links
            for target in LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                path, _, anchor = target.partition("#")
                file = (page.parent / path).resolve() if path else page
                where = f"{page.relative_to(REPO)}:{n}"
                if not file.exists():
                    problems.append(f"{where}: link to {target}: no such file")
                elif REPO not in file.parents and file != REPO:
                    problems.append(f"{where}: link to {target}: outside the repository")
                elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                    problems.append(f"{where}: link to {target}: {file.name} has no heading #{anchor}")
    assert not problems, "\n".join(problems)


FILE_SPAN = re.compile(r"(sharnn|train|bench|tests|launch|scripts|docs|\.ci)/([\w.-]+/)*"
                       r"([\w-]+\.(py|yaml|sh|json|md|png|cfg|toml)|[\w.-]+/|[\w-]+)")


def test_files_named_exist():
    """An inline code span that is a path of the repository (`sharnn/model.py`, `tests/golden/`, `.ci/run`)
    names a file or directory that exists (metric names such as `train/loss` are not paths: they have no
    extension and no trailing slash, and are left out)."""
    problems = []
    for page in PAGES:
        for n, span in inline_code(split_page(page)[1]):
            if FILE_SPAN.fullmatch(span) and ("." in span.rsplit("/", 1)[-1] or span.endswith("/")
                                              or span.startswith(".ci/")):
                if not (REPO / span).exists():
                    problems.append(f"{page.relative_to(REPO)}:{n}: no file or directory {span}")
    assert not problems, "\n".join(problems)


def test_python_blocks_import_what_exists():
    """`from sharnn... import name` in the pages' Python blocks: the module and the names exist."""
    problems = []
    for snippet in all_snippets():
        if snippet.kind != "python":
            continue
        for node in ast.walk(ast.parse(snippet.text)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sharnn":
                where = f"{snippet.page.relative_to(REPO)}:{snippet.line + node.lineno - 1}"
                try:
                    module = importlib.import_module(node.module)
                except ImportError as e:
                    problems.append(f"{where}: {e}")
                    continue
                problems += [f"{where}: {node.module} has no {a.name}" for a in node.names
                             if not hasattr(module, a.name)]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "sharnn" and importlib.util.find_spec(a.name) is None:
                        problems.append(f"{snippet.page.relative_to(REPO)}: no module {a.name}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("text,expected", [
    ("sharnn-train --preset tiny --model.mem_len=256 --no-vary-bptt > log",
     [["sharnn-train", "--preset", "tiny", "--model.mem_len=256", "--no-vary-bptt"]]),
    ("NGPU=8 launch/multinode.sh --print a b -- --lr_scaling sqrt  # note",
     [["NGPU=8", "launch/multinode.sh", "--print", "a", "b", "--", "--lr_scaling", "sqrt"]]),
    ("accelerate launch --num_processes 2 -m train \\\n    --data d --out o",
     [["accelerate", "launch", "--num_processes", "2", "-m", "train", "--data", "d", "--out", "o"]]),
    ("NGPU=$(nvidia-smi -L | wc -l)", [["NGPU=$"], ["nvidia-smi", "-L"], ["wc", "-l"]]),
])
def test_shell_parsing(text, expected):
    assert [words for _, words in shell_commands(text)] == expected
