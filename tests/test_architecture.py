"""The import graph of sslt_cli runs one way, as docs/architecture.md draws it: layers, no cycle (lazy imports count);
and the document has a row for every module."""
from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sslt_cli"
DOC = PACKAGE.parent / "docs" / "architecture.md"

# docs/architecture.md's picture, bottom (0) to top; a package (ablate) covers its modules
LAYERS = {
    "sslt_cli": 0, "errors": 0, "catalog": 0, "protocols": 0,
    "config": 1, "preflight": 1, "interrupts": 1, "folder_lock": 1, "data.difficulty": 1,
    "runs": 2, "tracking": 2, "progress": 2, "model": 2, "losses": 2, "metrics": 2, "negative_metrics": 2,
    "distributed": 2, "audio": 2, "data.manifest": 2, "data.augment": 2, "data.workers": 2, "learning_check": 2,
    "data.datasets": 3, "data.annotations": 3, "data.negatives": 3, "data.is3": 3, "data.synthetic": 3,
    "data.prepare": 3, "data": 3,
    "checkpoint": 4, "published": 4, "ogl": 4, "families": 4, "frontends": 2,
    "evaluate": 5,
    "train": 6, "retrieve": 6, "compare": 6, "calibration": 6, "localize": 6, "localize_render": 2, "media": 3,
    "ablate": 7,
    "cli": 8, "__main__": 8,
}


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts) or "sslt_cli"] = path
    return names


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Project modules ``path`` imports anywhere in the file (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sslt_cli":
            base = node.module.removeprefix("sslt_cli").lstrip(".") or "sslt_cli"
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base != "sslt_cli" else alias.name
                found.add(sub if sub in known else base)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("sslt_cli.") for a in node.names if a.name.startswith("sslt_cli."))
    return found & known


def layer(name: str) -> int:
    return LAYERS[name] if name in LAYERS else LAYERS[name.split(".")[0]]


def graph() -> dict[str, set[str]]:
    names = module_names()
    return {name: imports_of(path, set(names)) - {name} for name, path in names.items()}


def test_every_module_has_a_layer() -> None:
    missing = [name for name in module_names() if name not in LAYERS and name.split(".")[0] not in LAYERS]
    assert not missing, f"add these modules to docs/architecture.md and LAYERS: {missing}"


def test_imports_only_go_down() -> None:
    upward = [f"{name} (layer {layer(name)}) imports {dep} (layer {layer(dep)})"
              for name, deps in graph().items() for dep in sorted(deps) if layer(dep) > layer(name)]
    assert not upward, upward


def test_the_import_graph_has_no_cycle() -> None:
    edges = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(edges[name]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_the_checker_sees_lazy_imports() -> None:
    # train imports evaluate inside a function as well as at the top; retrieve only inside functions
    assert "evaluate" in graph()["train"] and "checkpoint" in graph()["retrieve"]
    assert "train" not in graph()["retrieve"]  # retrieval needs nothing of training


def documented_modules() -> set[str]:
    """The module files docs/architecture.md's module table names in its first column (``evaluate/maps.py``)."""
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`([\w/]+\.py)`", row.split("|")[1])}


def test_every_module_has_its_row_in_the_architecture_document() -> None:
    files = {path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")}
    documented = documented_modules()
    assert not sorted(files - documented), f"add a row to docs/architecture.md for: {sorted(files - documented)}"
    assert not sorted(documented - files), f"docs/architecture.md has rows for no module: {sorted(documented - files)}"
