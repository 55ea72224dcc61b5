"""The package's shape: what travels as remote code, and no import cycles (docs/architecture.md)."""

import ast
from pathlib import Path

from transformers.dynamic_module_utils import get_relative_import_files

PACKAGE = Path(__file__).resolve().parents[1] / "stitched_llama"


def module_imports(path: Path) -> set[str]:
    """Sibling modules `path` imports when it is imported (module-level statements, not function bodies)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("stitched_llama."):
                found.add(node.module.split(".")[1])
    return found


def test_only_the_config_and_the_model_travel_as_remote_code():
    travelling = {Path(p).name for p in get_relative_import_files(str(PACKAGE / "modeling_stitched_llama.py"))}
    assert travelling == {"configuration_stitched_llama.py"}  # plus the modeling file itself


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (module -> modules it imports), or None."""
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> list[str] | None:
        state[name] = "open"
        for other in sorted(graph[name]):
            if state.get(other) == "open":
                return [*trail, name, other]
            if other not in state and (cycle := visit(other, [*trail, name])):
                return cycle
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name, [])):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    modules = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    graph = {name: module_imports(path) & modules.keys() for name, path in modules.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert graph["modeling_stitched_llama"] == {"configuration_stitched_llama"}
    assert graph["configuration_stitched_llama"] == set()


def test_the_cycle_check_finds_a_cycle(tmp_path):
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("from stitched_llama.c import y\nimport os\n")
    (tmp_path / "c.py").write_text("def f():\n    from .a import z\n")  # inside a function: not at import
    graph = {name: module_imports(tmp_path / f"{name}.py") for name in "abc"}
    assert graph == {"a": {"b"}, "b": {"c"}, "c": set()} and find_cycle(graph) is None
    graph["c"].add("a")
    assert find_cycle(graph) == ["a", "b", "c", "a"]
