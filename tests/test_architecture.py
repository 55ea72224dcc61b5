"""The package's shape: what travels as remote code, and no import cycles (docs/architecture.md)."""

import ast
from pathlib import Path

from transformers.dynamic_module_utils import get_relative_import_files

PACKAGE = Path(__file__).resolve().parents[1] / "stitched_llama"


def module_name(path: Path) -> str:
    """`search` for stitched_llama/search.py, `cli.build` for stitched_llama/cli/build.py, `cli` for its __init__."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports(path: Path, package: tuple[str, ...] = ()) -> set[str]:
    """Sibling modules `path` imports when it is imported (module-level statements, not function bodies), as
    dotted names below stitched_llama; `package` is the subpackage holding `path` (`("cli",)`), for `from ..x`."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            if node.level - 1 > len(package):
                continue  # above stitched_llama
            base = list(package[: len(package) - (node.level - 1)])
            if node.module:
                found.add(".".join(base + node.module.split(".")))
            else:
                found.update(".".join([*base, alias.name]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stitched_llama."):
            found.add(node.module.removeprefix("stitched_llama."))
    return found


def package_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports at import time, subpackages (`cli/`) included."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    paths.pop("", None)  # stitched_llama/__init__.py

    def module(name: str) -> str:  # `cli.main` (`from . import main` in cli/) is the module `cli`
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in paths.items():
        imported = {module(n) for n in module_imports(path, tuple(path.relative_to(PACKAGE).parent.parts))}
        graph[name] = imported - {"", name}
    return graph


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
    graph = package_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert graph["modeling_stitched_llama"] == {"configuration_stitched_llama"}
    assert graph["configuration_stitched_llama"] == set()
    commands = {f"cli.{name}" for name in ("build", "train", "evaluate", "export", "chat", "demo")}
    assert graph["cli"] == commands | {"cli._common"}  # the command package is read, one module per command
    assert all(graph[name] == {"cli._common"} for name in commands), {name: graph[name] for name in commands}


def test_the_cli_imports_no_heavy_library_at_import_time():
    # `stitched-llama --help` must not wait for them: each command imports what it needs when it runs.
    heavy = {"torch", "transformers", "datasets", "peft", "accelerate", "matplotlib"}
    for path in (PACKAGE / "cli").glob("*.py"):
        imported = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & heavy, (path.name, imported & heavy)


def test_the_cycle_check_finds_a_cycle(tmp_path):
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("from stitched_llama.c import y\nimport os\n")
    (tmp_path / "c.py").write_text("def f():\n    from .a import z\n")  # inside a function: not at import
    graph = {name: module_imports(tmp_path / f"{name}.py") for name in "abc"}
    assert graph == {"a": {"b"}, "b": {"c"}, "c": set()} and find_cycle(graph) is None
    graph["c"].add("a")
    assert find_cycle(graph) == ["a", "b", "c", "a"]


def test_help_does_not_import_bitsandbytes():
    import subprocess
    import sys

    # bitsandbytes prints "Failed to load CPU gemm_4bit_forward ..." when imported on a CPU machine.
    script = (
        "import sys\nfrom stitched_llama.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('bitsandbytes imported' if 'bitsandbytes' in sys.modules else 'bitsandbytes not imported')"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: stitched-llama" in result.stdout and "bitsandbytes not imported" in result.stdout
    assert "gemm_4bit" not in result.stdout + result.stderr
