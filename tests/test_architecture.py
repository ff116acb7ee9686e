"""The import rules of docs/architecture.md, checked on the source: the model package never reaches for the
trainer or the distributed stack, and nothing reaches into the benchmarks or the tests."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

# package -> top-level modules it may not import
FORBIDDEN = {
    "sharnn": {"train", "bench", "tests", "accelerate", "deepspeed", "tensorboard", "transformers"},
    "train": {"bench", "tests"},
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package):
    files = sorted((REPO / package).glob("*.py"))
    assert files
    bad = {f.name: sorted(imported_modules(f) & FORBIDDEN[package]) for f in files}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_the_architecture_document_names_every_module():
    doc = (REPO / "docs" / "architecture.md").read_text()
    for package in ("sharnn", "train", "bench"):
        for f in sorted((REPO / package).glob("*.py")):
            if f.name != "__init__.py":
                name = f"{package}/{f.name}"
                assert name in doc, f"docs/architecture.md does not mention {name}"
