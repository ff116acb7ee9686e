"""The layering of docs/architecture.md, checked on the source: the model core imports nothing above it, every
import goes down the layers, no two modules import each other (directly or round a circle), nothing reaches
into the benchmarks or the tests, and no function in sharnn/ or train/ is longer than a screen."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

# Layers, lowest first: a module may import its own layer's modules and those of lower layers only.
LAYERS = {
    "base": ("sharnn.cli",),  # the spellings and argument types every command line shares (argparse only)
    "core": ("sharnn.config", "sharnn.model", "sharnn.kernels", "sharnn.state", "sharnn.optim"),
    "io": ("sharnn.io",),
    "corpus": ("sharnn.corpus",),
    "commands": ("sharnn.generate", "sharnn.attention_report", "sharnn.convert", "sharnn.entry"),
    "train": ("train",),
    "bench": ("bench",),
}
RANK = {layer: i for i, layer in enumerate(LAYERS)}
# The model core imports only these outside the standard library.
CORE_THIRD_PARTY = {"torch", "numpy"}
# Imports inside a function that go up on purpose, each with its reason.
LAZY_UPWARD = {
    ("sharnn.model", "sharnn.io.pretrained"): "SHARNN.from_pretrained/save_pretrained/push_to_hub: the Hub "
                                              "mixin, loaded when one is called",
    ("sharnn", "sharnn.io.pretrained"): "sharnn.load_model/save_model re-exported lazily",
}
# package -> top-level modules it may not import
FORBIDDEN = {
    "sharnn": {"train", "bench", "tests", "accelerate", "deepspeed", "tensorboard", "transformers"},
    "train": {"bench", "tests"},
}
PACKAGES = ("sharnn", "train", "bench")
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def layer_of(module: str) -> str:
    for layer, prefixes in LAYERS.items():
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return layer
    raise AssertionError(f"{module} is in no layer of tests/unit/test_architecture.py: add it to LAYERS and "
                         "docs/architecture.md")


def imports(module: str) -> list[tuple[str, bool]]:
    """(imported name, at module level) for every import in the module, relative ones resolved."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(n) for n in tree.body}
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                   for n in ast.walk(block)}  # annotations only: never run
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + [node.module])
            # `from pkg import sub` imports the submodule sub; `from mod import name` the module mod
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found += [(name, id(node) in top) for name in names]
    return found


def internal(name: str) -> str | None:
    """The repository module an import name refers to (a package's __init__ counts as the package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def graph(module_level_only: bool) -> dict[str, set[str]]:
    edges = {}
    for module in MODULES:
        edges[module] = {target for name, top in imports(module) if (top or not module_level_only)
                         and (target := internal(name)) and target != module
                         and not MODULES[target].name == "__init__.py"}  # packages only re-export
    return edges


def test_no_import_cycles():
    edges = {m: {t for t in ts if (m, t) not in LAZY_UPWARD} for m, ts in graph(False).items()}
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, f"modules that import each other: {cycles}"


def test_imports_go_down_the_layers():
    up = []
    for module, targets in graph(False).items():
        if MODULES[module].name == "__init__.py":  # a package's re-exports (lazy: see LAZY_UPWARD)
            continue
        for target in targets:
            if RANK[layer_of(target)] > RANK[layer_of(module)] and (module, target) not in LAZY_UPWARD:
                up.append(f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})")
    assert not up, up


def test_the_core_imports_torch_and_numpy_only():
    import sys

    core = [m for m, path in MODULES.items() if path.name != "__init__.py" and layer_of(m) == "core"]
    assert len(core) == 5
    outside = {}
    for module in core:
        for name, _ in imports(module):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in CORE_THIRD_PARTY or top == "__future__":
                continue
            if internal(name) and (MODULES[internal(name)].name == "__init__.py"
                                   or layer_of(internal(name)) == "core"):
                continue
            if (module, internal(name)) in LAZY_UPWARD:
                continue
            outside.setdefault(module, []).append(name)
    assert not outside, outside


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package):
    bad = {}
    for module, path in MODULES.items():
        if module.split(".")[0] == package:
            tops = {name.split(".")[0] for name, _ in imports(module)}
            if hit := sorted(tops & FORBIDDEN[package]):
                bad[module] = hit
    assert not bad, bad


def test_no_function_is_longer_than_a_screen():
    long = []
    for module, path in MODULES.items():
        if module.split(".")[0] not in ("sharnn", "train"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_the_architecture_document_names_every_module():
    doc = (REPO / "docs" / "architecture.md").read_text()
    for module, path in MODULES.items():
        if path.name != "__init__.py":
            name = str(path.relative_to(REPO))
            assert name in doc, f"docs/architecture.md does not mention {name}"
