"""The house plan, kept by CI: no import loop among the project's modules, and no arrow from a lower layer up.

Every import counts, also the ones inside functions: a late import hides a loop from Python, not from a
reader. The layers, lowest first: the shard format (`shards/`), the sources and filters, the stages
(`pmd_pipeline/fetch`, `pmd_pipeline/tokens`), the spine and the commands.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pmd_pipeline", "sources", "filters", "shards")
# What the shard format may use of pmd_pipeline: the error type, the crash points and the storage layer,
# nothing of a stage.
SHARDS_MAY_IMPORT = {"pmd_pipeline", "pmd_pipeline.errors", "pmd_pipeline.faults", "pmd_pipeline.storage"}
# Sources and filters read the config's dataclasses and open archive members (`archive::member`, the storage
# layer's one opener, which the image stage uses too); they never reach into a stage or the spine.
SOURCES_MAY_IMPORT = SHARDS_MAY_IMPORT | {"pmd_pipeline.config", "pmd_pipeline.archive_members"}
# What the archive opener stands on: the storage layer and the error type, so any layer may use it.
ARCHIVE_MEMBERS_MAY_IMPORT = {"pmd_pipeline", "pmd_pipeline.errors", "pmd_pipeline.storage"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports (a `from a import b` names a.b when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [_module_or_parent(f"{node.module}.{a.name}", modules) for a in node.names]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


def _module_or_parent(name: str, modules: dict[str, Path]) -> str:
    return name if name in modules else name.rsplit(".", 1)[0]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each an import loop."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_every_package_and_their_imports(graph):
    assert {"pmd_pipeline.cli", "pmd_pipeline.fetch.web", "pmd_pipeline.tokens.stage", "shards.layout"} <= set(graph)
    assert "shards.layout" in graph["shards.writer"] and "pmd_pipeline.build" in graph["pmd_pipeline.cli"]


def test_no_import_loop(graph):
    assert cycles(graph) == []


def test_the_loop_finder_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_shard_format_imports_no_stage(graph):
    wrong = {m: sorted(t for t in targets if t.startswith("pmd_pipeline") and t not in SHARDS_MAY_IMPORT)
             for m, targets in graph.items() if m.startswith("shards")}  # fmt: skip
    assert {m: t for m, t in wrong.items() if t} == {}


def test_sources_and_filters_import_no_stage(graph):
    wrong = {m: sorted(t for t in targets if t.startswith("pmd_pipeline") and t not in SOURCES_MAY_IMPORT)
             for m, targets in graph.items() if m.startswith(("sources", "filters"))}  # fmt: skip
    assert {m: t for m, t in wrong.items() if t} == {}


def test_the_archive_opener_stands_on_the_storage_layer_alone(graph):
    assert graph["pmd_pipeline.archive_members"] <= ARCHIVE_MEMBERS_MAY_IMPORT
    assert "pmd_pipeline.archive_members" in graph["pmd_pipeline.fetch.archives"]  # one opener, not two
    assert "pmd_pipeline.archive_members" in graph["sources.rawio"]


def test_only_the_cli_starts_ray():
    starters = sorted(
        module_name(p)
        for pkg in PACKAGES
        for p in (ROOT / pkg).rglob("*.py")
        if "ray.init(" in p.read_text()
    )
    assert starters == ["pmd_pipeline.cli"]


def test_no_module_shadows_the_standard_library():
    import sys

    names = {name.rsplit(".", 1)[-1] for name in project_modules()}
    assert names & set(sys.stdlib_module_names) == set()
